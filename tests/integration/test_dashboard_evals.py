"""The dashboard's eval views over folders written with clipforge's own writers: eval values keyed by
(model label, dataset, task, metric), the eval job's page data, compare side by side, sweep detection and the
sweep view, and the scaling page's reasons for leaving a run out.

The eval suite folder is what a `kind: eval` job with an untrained and a trained model leaves: one CLIP_benchmark
file per (dataset, model, task), named by the eval job's own `result_filename`, and results.jsonl written with
run_dir's `json_lines`; a folder of before holds results.json with the task's old name `retrieval`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.runtime.run_dir import (
    LEGACY_RESULTS_FILE,
    RESULTS_FILE,
    SPEC_FILE,
    dump_spec,
    json_lines,
    write_spec_files,
    write_summary,
)

from test_dashboard_api import CLS, RET, key, logged, rows_by_id, serving, write_run

# The numbers: a linear probe's accuracy beside zero-shot accuracies of the untrained and trained model.
SUITE = [  # (label, dataset, task, metrics)
    ("untrained", "fashion_mnist", "zeroshot_classification", {"acc1": 0.10, "acc5": 0.52, "n_classes": 10}),
    ("trained", "fashion_mnist", "zeroshot_classification", {"acc1": 0.12, "acc5": 0.55, "n_classes": 10}),
    ("untrained", "fashion_mnist", "linear_probe", {"acc1": 0.31, "n_classes": 10}),
    ("trained", "fashion_mnist", "linear_probe", {"acc1": 0.44, "n_classes": 10}),
    ("untrained", "tuxpaint_heldout", "zeroshot_retrieval", {"image_retrieval_recall@1": 0.05, "n_images": 40}),
    ("trained", "tuxpaint_heldout", "zeroshot_retrieval", {"image_retrieval_recall@1": 0.2, "n_images": 40}),
]


def write_eval_suite(folder: Path) -> None:
    """An eval job's folder as the job writes it: a CLIP_benchmark file per result, then results.jsonl."""
    from clipforge.eval.evaluator import result_filename

    folder.mkdir(parents=True)
    results = [{"dataset": ds, "model": "tiny", "pretrained": label, "task": task, "metrics": metrics,
                "language": "en"} for label, ds, task, metrics in SUITE]
    for r in results:
        (folder / result_filename(r["dataset"], r["pretrained"], r["model"], r["task"])).write_text(
            json.dumps(r, indent=2))
    (folder / RESULTS_FILE).write_text(json_lines(results))


def write_old_eval(folder: Path) -> None:
    """An eval folder of before: results.json (a JSON list), retrieval under its old task name."""
    folder.mkdir(parents=True)
    (folder / LEGACY_RESULTS_FILE).write_text(json.dumps([
        {"dataset": "tuxpaint_heldout", "model": "tiny", "pretrained": "trained", "task": "retrieval",
         "metrics": {"image_retrieval_recall@1": 0.18}, "language": "en"}]))


def write_sweep(root: Path) -> Path:
    """A two-child learning-rate sweep as the sweep runner records it, its children's run folders written as the
    trainer writes them (spec.yaml + run.json, metrics.jsonl, summary.json); the second child failed."""
    from clipforge.cluster.specs import load_spec
    from clipforge.cluster.sweep_children import expand_children
    from clipforge.cluster.sweep_record import SweepRecord

    storage = root / "lrsweep"
    sweep_file = root.parent / "lrsweep.yaml"
    sweep_file.write_text(f"""\
kind: sweep
name: lrs
storage: {storage}
base:
  kind: train
  name: lr
  storage: unused
  model: {{name: tiny}}
  data: {{shards: [/data/shards], batch_size: 8}}
grid: {{optim.lr: [0.001, 0.01]}}
""")
    spec = load_spec(sweep_file, [])
    children = expand_children(spec)
    record = SweepRecord(spec, children, mode="local")
    for i, child in enumerate(children):
        record.started(child)
        run = Path(child.run_dir)
        write_spec_files(str(run), child.spec)
        write_run(root, f"lrsweep/{child.dir}", steps=4, spec=False, evals={"fashion/acc1": [0.1, 0.2 + 0.1 * i]})
        if i == 0:
            write_summary(str(run), {"samples_seen": 160, "gmacs": 2.0})
            record.ended(child, "finished")
        else:
            record.ended(child, "failed", "loss diverged at step 20")
    return storage


@pytest.fixture()
def eval_folder(tmp_path) -> Path:
    root = tmp_path / "runs"
    write_eval_suite(root / "demo" / "eval" / "suite")
    write_old_eval(root / "demo" / "eval" / "old")
    write_run(root, "demo/train", steps=4, index=True, evals={"fashion_mnist/acc1": [0.05, 0.09, 0.11, None]})
    return root


def test_eval_values_are_keyed_by_model_label_dataset_task_and_metric(eval_folder):
    with serving(eval_folder) as client:
        rows = rows_by_id(client)
        status, listing = client.get("/api/runs")
    suite = rows["demo/eval/suite"]
    assert suite["kind"] == "eval" and suite["status"] == "finished" and suite["model"] == "tiny"
    # Every score under its own key: the linear probe's 0.44 is not the zero-shot accuracy, nor are the trained
    # model's values the untrained one's; counts are left out.
    assert suite["evals"] == {key(label, ds, task, m): pytest.approx(v) for label, ds, task, metrics in SUITE
                              for m, v in metrics.items() if not m.startswith("n_")}
    assert suite["evals"][key("trained", "fashion_mnist", CLS, "acc1")] == pytest.approx(0.12)
    assert suite["evals"][key("untrained", "fashion_mnist", CLS, "acc1")] == pytest.approx(0.10)
    assert suite["evals"][key("trained", "fashion_mnist", "linear_probe", "acc1")] == pytest.approx(0.44)
    # The folder of before: results.json, and `retrieval` read as `zeroshot_retrieval`.
    old = rows["demo/eval/old"]
    assert old["kind"] == "eval" and old["status"] == "finished"
    assert old["evals"] == {key("trained", "tuxpaint_heldout", RET, "image_retrieval_recall@1"): 0.18}
    # A training run's logged evals carry their own label, apart from the eval jobs' models.
    assert rows["demo/train"]["evals"] == {logged("fashion_mnist", "acc1"): 0.11}
    # The folders holding these runs are plain folders, not sweeps.
    assert {r["sweep"] for r in rows.values()} == {None}
    assert rows["demo/eval/suite"]["folder"] == "demo/eval"
    assert status == 200 and not any(g["sweep"] for g in listing["groups"])
    assert listing["metric_parts"][key("untrained", "fashion_mnist", "linear_probe", "acc1")] == {
        "model": "untrained", "dataset": "fashion_mnist", "task": "linear_probe", "metric": "acc1"}


def test_eval_job_page_data_is_a_table_of_scores_without_training_records(eval_folder):
    with serving(eval_folder) as client:
        status, data = client.get("/api/run", id="demo/eval/suite")
    assert status == 200 and data["row"]["kind"] == "eval"
    assert data["records"] == [] and data["summary"] is None and data["checkpoints"] == []
    # results.jsonl holds every result: the per-task files beside it are not counted again.
    assert len(data["evals"]) == len(SUITE) and {e["file"] for e in data["evals"]} == {
        "demo/eval/suite/results.jsonl"}
    table = sorted((e["model"], e["dataset"], e["task"], e["metric"], e["value"]) for e in data["eval_table"])
    assert table == sorted((label, ds, task, m, v) for label, ds, task, metrics in SUITE
                           for m, v in metrics.items() if not m.startswith("n_"))


def test_eval_job_page_shows_the_eval_spec_as_yaml(eval_folder):
    """An eval folder holding its spec.yaml (dumped as the trainer dumps its own): the page gets the YAML text, the
    runs table the spec's name."""
    from clipforge.eval.spec import EvalSpec

    folder = eval_folder / "demo" / "eval" / "suite"
    spec = EvalSpec.model_validate({"kind": "eval", "name": "demo-suite", "storage": str(folder), "models": [
        {"name": "tiny", "label": "untrained"}, {"name": "tiny", "label": "trained", "checkpoint": "/ck"}],
        "tasks": [{"task": "zeroshot_retrieval", "dataset": "tuxpaint_heldout", "shards": ["/shards"]}]})
    (folder / SPEC_FILE).write_text(dump_spec(spec))
    with serving(eval_folder) as client:
        status, data = client.get("/api/run", id="demo/eval/suite")
    assert status == 200 and data["spec_error"] is None
    assert data["spec_text"] == dump_spec(spec) and data["spec"]["models"][1]["label"] == "trained"
    assert data["row"]["name"] == "demo-suite" and data["row"]["kind"] == "eval" and data["row"]["model"] == "tiny"


def test_compare_puts_each_runs_model_labels_side_by_side(eval_folder):
    with serving(eval_folder) as client:
        status, data = client.get("/api/compare", ids="demo/eval/suite,demo/train,demo/eval/old")
        assert client.get("/api/compare", ids="demo/eval/suite,nope")[0] == 404
        assert client.get("/api/compare", ids="../x")[0] == 403
        assert client.get("/api/compare")[0] == 400
    assert status == 200
    assert [(c["run"], c["model"]) for c in data["columns"]] == [
        ("demo/eval/suite", "trained"), ("demo/eval/suite", "untrained"), ("demo/train", "training (best)"),
        ("demo/eval/old", "trained")]
    by_row = {(r["dataset"], r["task"], r["metric"]): r["values"] for r in data["rows"]}
    assert list(by_row) == sorted(by_row)
    assert by_row[("fashion_mnist", CLS, "acc1")] == [pytest.approx(0.12), pytest.approx(0.10), 0.11, None]
    assert by_row[("fashion_mnist", "linear_probe", "acc1")] == [pytest.approx(0.44), pytest.approx(0.31), None, None]
    assert by_row[("tuxpaint_heldout", RET, "image_retrieval_recall@1")] == [
        pytest.approx(0.2), pytest.approx(0.05), None, 0.18]


def test_only_a_folder_with_sweep_json_is_a_sweep(tmp_path):
    root = tmp_path / "runs"
    write_sweep(root)
    write_run(root, "plain/a", steps=2, index=True)
    write_run(root, "plain/b", steps=2, index=True)
    with serving(root) as client:
        rows = rows_by_id(client)
        groups = {g["id"]: g for g in client.get("/api/runs")[1]["groups"]}
        status, sweep = client.get("/api/sweep", id="lrsweep")
        plain_status, plain = client.get("/api/sweep", id="plain")
        assert client.get("/api/sweep", id="../x")[0] == 403
    assert groups["lrsweep"] == {"id": "lrsweep", "runs": 2, "sweep": True, "fields": ["optim.lr"]}
    assert groups["plain"] == {"id": "plain", "runs": 2, "sweep": False, "fields": []}
    assert rows["plain/a"]["sweep"] is None and rows["plain/a"]["swept"] == {} and rows["plain/a"]["folder"] == "plain"
    first, second = "lrsweep/lr0.001", "lrsweep/lr0.01"
    assert rows[first]["sweep"] == "lrsweep" and rows[first]["swept"] == {"optim.lr": 0.001}
    assert plain_status == 404 and "plain is not a sweep" in plain["error"] and "sweep.json" in plain["error"]
    # The sweep view: swept values against final metrics, in sweep.json's order, with each child's state.
    assert status == 200 and sweep["name"] == "lrs" and sweep["fields"] == ["optim.lr"]
    assert [(c["id"], c["values"], c["status"]) for c in sweep["children"]] == [
        (first, {"optim.lr": 0.001}, "finished"), (second, {"optim.lr": 0.01}, "failed")]
    assert sweep["children"][1]["error"] == "loss diverged at step 20"
    assert [c["evals"] for c in sweep["children"]] == [{logged("fashion", "acc1"): 0.2},
                                                       {logged("fashion", "acc1"): pytest.approx(0.3)}]
    assert sweep["metrics"] == [logged("fashion", "acc1")]


def test_scaling_says_in_words_why_a_run_is_left_out(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "grp/no_compute", steps=2, evals={"ds/acc1": [0.2, 0.3]})
    write_run(root, "grp/no_metric", steps=2, summary={"samples_seen": 100, "gmacs": 1.0})
    write_run(root, "grp/nothing", steps=2)
    with serving(root) as client:
        status, data = client.get("/api/scaling", group="grp")
        assert client.get("/api/scaling", group="nope")[0] == 404
    assert status == 200 and data["metric"] == logged("ds", "acc1")
    reasons = {s["id"]: s["reason"] for s in data["skipped"]}
    assert reasons["grp/no_compute"].startswith("no compute recorded")
    assert reasons["grp/no_metric"] == f"no acc1 of training (best) on ds ({CLS}) recorded"
    assert "no compute recorded" in reasons["grp/nothing"] and "no acc1" in reasons["grp/nothing"]
    assert not any("None" in r for r in reasons.values())
    with serving(tmp_path / "runs" / "grp" / "nothing") as client:  # no eval metric anywhere
        reasons = {s["id"]: s["reason"] for s in client.get("/api/scaling")[1]["skipped"]}
    assert reasons == {"": "no compute recorded (summary.json has no gmacs and no model estimate); "
                           "no eval metric recorded"}
