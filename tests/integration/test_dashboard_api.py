"""The dashboard's HTTP API on a real in-process server over run folders written here.

Covers: the runs list (status, sweep, kind, compute, best evals), the run page payload, live
metrics by byte offset (corrupt and half-written lines), path traversal in every parameter
(.., absolute, %2e%2e, %252e%252e, symlinks out of the folder), and an fsspec (memory://) folder.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from clipforge.dashboard.server import start_in_thread
from clipforge.dashboard.spec import DashboardSpec
from clipforge.runtime.run_dir import dump_spec, write_spec_files
from clipforge.train.spec import TrainSpec

SECRET = "TOP-SECRET-OUTSIDE-THE-RUNS-FOLDER"
CLS, RET = "zeroshot_classification", "zeroshot_retrieval"


def key(model: str, dataset: str, task: str, metric: str) -> str:
    """An eval value's key in the API: (model label, dataset, task, metric)."""
    return f"{model} · {dataset} · {task} · {metric}"


def logged(dataset: str, metric: str, task: str = CLS) -> str:
    """The key of an eval value logged during training (metrics.jsonl): the best value, under its own label."""
    return key("training (best)", dataset, task, metric)


# -- fixture run folders ---------------------------------------------------------------------------

def train_spec(name: str, storage: str, model: str = "tiny") -> TrainSpec:
    return TrainSpec.model_validate({"kind": "train", "name": name, "storage": storage, "model": {"name": model},
                                     "data": {"shards": ["/data/shards"], "batch_size": 8}})


def train_spec_yaml(name: str, storage: str, model: str = "tiny") -> str:
    return dump_spec(train_spec(name, storage, model))


def metric_lines(steps: int, every: int = 5, batch: int = 8, t0: float = 1.7e9, evals: dict | None = None,
                 rate: float = 0.05, first: int = 1) -> list[str]:
    lines = []
    for i in range(first, first + steps):
        step = i * every
        rec = {"step": step, "epoch": 1 + step // 50, "loss": 4.0 / (1 + rate * step), "lr": 1e-3 * min(1, step / 10),
               "logit_scale": 14.3 + 0.01 * step, "samples_per_second": 100.0 + i, "step_time": 0.08,
               "data_wait": 0.02, "grad_norm": 1.0 / i, "memory": 1e8 + i, "time": t0 + i,
               "samples_seen": step * batch}
        for key, values in (evals or {}).items():
            if i - first < len(values) and values[i - first] is not None:
                rec[f"eval/{key}"] = values[i - first]
        lines.append(json.dumps(rec))
    return lines


def write_run(root: Path, rel: str, *, steps: int = 6, summary: dict | None = None, evals: dict | None = None,
              corrupt: bool = False, half_line: bool = False, spec: bool = True, model: str = "tiny",
              rate: float = 0.05, index: bool = False) -> Path:
    """A training run's folder. `index`: spec.yaml and run.json as the trainer writes them now; else spec.yaml
    alone, as runs written before run.json existed have it."""
    run = root / rel
    run.mkdir(parents=True, exist_ok=True)
    if spec and index:
        write_spec_files(str(run), train_spec(rel.replace("/", "-"), str(run), model))
    elif spec:
        (run / "spec.yaml").write_text(train_spec_yaml(rel.replace("/", "-"), str(run), model))
    lines = metric_lines(steps, evals=evals, rate=rate)
    if corrupt:
        lines.insert(2, '{"step": 11, "loss": 3.9, "lr"')  # a line cut by a crash, then the run went on
        lines.insert(4, "\x00\x00garbage")
    text = "\n".join(lines) + "\n"
    if half_line:
        text += '{"step": 999, "loss": 1.2'
    if steps:
        (run / "metrics.jsonl").write_text(text)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def set_mtime(path: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def make_runs_folder(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.0, "note": SECRET}) + "\n")
    (outside / "secret.txt").write_text(SECRET)

    # alpha, the sweep's runs and `live` have run.json, as runs written now do; the other runs have only spec.yaml.
    alpha = write_run(root, "alpha", steps=6, corrupt=True, half_line=True, index=True,
                      summary={"steps": 30, "samples_seen": 240, "samples_per_second": 123.0, "wall_seconds": 42.0,
                               "final_loss": 1.6, "params": 1_000_000, "gmacs": 0.5},
                      evals={"fashion/acc1": [None, 0.2, None, 0.35, None, 0.3]})
    (alpha / "eval" / "trained").mkdir(parents=True)
    (alpha / "eval" / "trained" / "results.json").write_text(json.dumps([
        {"dataset": "tux", "model": "tiny", "pretrained": "trained", "task": "retrieval", "language": "en",
         "metrics": {"image_retrieval_recall@1": 0.25, "text_retrieval_recall@1": 0.5, "n_images": 40}},
        {"dataset": "fashion", "model": "tiny", "pretrained": "trained", "task": "zeroshot_classification",
         "language": "en", "metrics": {"acc1": 0.4, "acc5": float("nan"), "n_classes": 3}},
    ], allow_nan=True))
    ckpt = alpha / "checkpoints" / "epoch_0001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 30, "epoch": 1, "samples_seen": 240, "loss": 1.6,
                                                "model_name": "tiny", "spec": {"model": {"name": "tiny"}}}))
    (alpha / "checkpoints" / "epoch_0002").mkdir()  # incomplete: no meta.json

    sweep = root / "sweep"
    for i, _lr in enumerate((1e-3, 3e-3)):
        write_run(root, f"sweep/lr{i}", steps=4, rate=0.03 + 0.04 * i, index=True,
                  summary={"samples_seen": 160 * (i + 1), "params": 10, "gmacs": 2.0},
                  evals={"fashion/acc1": [0.1, 0.2 + i * 0.1, 0.15, None]})
    (sweep / "sweep.json").write_text(json.dumps({"fields": ["optim.lr"], "children": [
        {"dir": "lr0", "values": {"optim.lr": 1e-3}}, {"dir": "lr1", "values": {"optim.lr": 3e-3}}]}))

    write_run(root, "live", steps=3, index=True)  # metrics written just now, no summary: running
    old = write_run(root, "old", steps=3)
    set_mtime(old / "metrics.jsonl", 3600)
    broken = write_run(root, "broken", steps=2)
    (broken / "error.json").write_text(json.dumps({"message": "CUDA out of memory at step 10"}))
    fresh = root / "fresh"
    fresh.mkdir()
    (fresh / "spec.yaml").write_text(train_spec_yaml("fresh", str(fresh)))
    set_mtime(fresh / "spec.yaml", 3600)
    evalonly = root / "evals" / "untrained"
    evalonly.mkdir(parents=True)
    (evalonly / "results.json").write_text(json.dumps([
        {"dataset": "fashion", "model": "tiny", "pretrained": "untrained", "task": "zeroshot_classification",
         "language": "en", "metrics": {"acc1": 0.1}}]))
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    linked = root / "linked"
    linked.mkdir()
    (linked / "spec.yaml").write_text(train_spec_yaml("linked", str(linked)))
    (linked / "metrics.jsonl").symlink_to(outside / "secret" / "metrics.jsonl")
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    (root / "alpha" / "secret.txt").symlink_to(outside / "secret.txt")
    return root


# -- server ----------------------------------------------------------------------------------------

class Client:
    def __init__(self, url: str):
        self.url = url
        self.host, self.port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port

    def raw(self, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
        """Send `path` exactly as given (no client-side normalisation); returns (status, body bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get(self, path: str, **params):
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        status, body = self.raw(path + query)
        return status, json.loads(body)


@pytest.fixture()
def runs_folder(tmp_path) -> Path:
    return make_runs_folder(tmp_path)


@contextlib.contextmanager
def serving(root: Path | str):
    """A dashboard over `root` (a folder or fsspec URL) on a free loopback port, rescanning on every request."""
    spec = DashboardSpec(runs=str(root), port=0, estimate_compute=False, rescan_interval_s=0)
    server, thread = start_in_thread(spec)
    try:
        yield Client(server.url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture()
def client(runs_folder):
    with serving(runs_folder) as c:
        yield c


def rows_by_id(client: Client) -> dict[str, dict]:
    status, data = client.get("/api/runs")
    assert status == 200
    return {r["id"]: r for r in data["runs"]}


# -- runs list -------------------------------------------------------------------------------------

def test_runs_list_finds_every_run_with_status_kind_and_sweep(client):
    rows = rows_by_id(client)
    assert set(rows) == {"alpha", "sweep/lr0", "sweep/lr1", "live", "old", "broken", "fresh", "evals/untrained",
                         "linked"}
    assert {k: r["status"] for k, r in rows.items()} == {
        "alpha": "finished", "sweep/lr0": "finished", "sweep/lr1": "finished", "live": "running", "old": "stopped",
        "broken": "failed", "fresh": "stopped", "evals/untrained": "finished", "linked": "stopped"}
    assert rows["broken"]["error"] == "CUDA out of memory at step 10"
    assert rows["evals/untrained"]["kind"] == "eval" and rows["evals/untrained"]["model"] == "tiny"
    assert rows["fresh"]["kind"] == "train" and rows["fresh"]["model"] == "tiny" and rows["fresh"]["step"] is None
    assert rows["sweep/lr1"]["sweep"] == "sweep" and rows["alpha"]["sweep"] is None
    # A plain folder of runs is not a sweep: only its folder is named.
    assert rows["evals/untrained"]["sweep"] is None and rows["evals/untrained"]["folder"] == "evals"
    assert rows["sweep/lr1"]["swept"] == {"optim.lr": 3e-3}
    assert rows["alpha"]["name"] == "alpha" and rows["sweep/lr0"]["name"] == "sweep-lr0"


def test_runs_list_numbers_come_from_summary_metrics_and_evals(client):
    rows = rows_by_id(client)
    alpha = rows["alpha"]
    assert alpha["samples_seen"] == 240 and alpha["params"] == 1_000_000 and alpha["gmacs"] == 0.5
    assert alpha["compute"] == pytest.approx(120.0)
    assert alpha["wall_seconds"] == 42.0 and alpha["samples_per_second"] == 123.0
    # The best of the eval lines in metrics.jsonl and the eval folder's results, each under its own key (the
    # folder's results.json was written before the retrieval task got its CLIP_benchmark name); counts are not
    # scores, and an undefined acc5 (NaN) is no value.
    assert alpha["evals"] == {logged("fashion", "acc1"): pytest.approx(0.35),
                              key("trained", "fashion", CLS, "acc1"): pytest.approx(0.4),
                              key("trained", "tux", RET, "image_retrieval_recall@1"): pytest.approx(0.25),
                              key("trained", "tux", RET, "text_retrieval_recall@1"): pytest.approx(0.5)}
    assert rows["sweep/lr1"]["evals"] == {logged("fashion", "acc1"): pytest.approx(0.3)}
    # Without a summary: the last valid metrics line.
    live = rows["live"]
    assert live["step"] == 15 and live["samples_seen"] == 120 and live["compute"] is None
    assert live["samples_per_second"] == 103.0


def test_groups_and_metric_names(client):
    status, data = client.get("/api/runs")
    groups = {g["id"]: g for g in data["groups"]}
    assert groups["sweep"] == {"id": "sweep", "runs": 2, "sweep": True, "fields": ["optim.lr"]}
    assert groups["evals"] == {"id": "evals", "runs": 1, "sweep": False, "fields": []}
    assert {logged("fashion", "acc1"), key("trained", "tux", RET, "image_retrieval_recall@1")} <= set(data["metrics"])
    assert data["metric_parts"][key("untrained", "fashion", CLS, "acc1")] == {
        "model": "untrained", "dataset": "fashion", "task": CLS, "metric": "acc1"}


def test_new_run_appears_and_changed_status_is_seen(client, runs_folder):
    assert "late" not in rows_by_id(client)
    write_run(runs_folder, "late", steps=2)
    assert rows_by_id(client)["late"]["status"] == "running"
    (runs_folder / "late" / "summary.json").write_text(json.dumps({"samples_seen": 16}))
    assert rows_by_id(client)["late"]["status"] == "finished"


def test_row_follows_a_growing_and_a_rewritten_log(client, runs_folder):
    path = runs_folder / "live" / "metrics.jsonl"
    assert rows_by_id(client)["live"]["evals"] == {}
    with open(path, "a") as f:  # an eval line, then half of the next line
        f.write(metric_lines(1, first=4, evals={"ds/acc1": [0.5]})[0] + "\n" + '{"step": 25, "eval/ds/acc1": 0.9')
    row = rows_by_id(client)["live"]
    assert row["evals"] == {logged("ds", "acc1"): 0.5} and row["step"] == 20  # the half line counts for nothing yet
    with open(path, "a") as f:
        f.write(', "loss": 1.0}\n')
    row = rows_by_id(client)["live"]
    assert row["evals"] == {logged("ds", "acc1"): 0.9} and row["step"] == 25 and row["loss"] == 1.0
    # A resumed run rewrites the log from its checkpoint: the best of the dropped lines must not stick.
    path.write_text("\n".join(metric_lines(2, evals={"ds/acc1": [0.3, 0.2]})) + "\n" + "x" * 200 + "\n")
    row = rows_by_id(client)["live"]
    assert row["evals"] == {logged("ds", "acc1"): 0.3} and row["step"] == 10


def long_log(lines: int, t0: float, awkward: bool) -> list[str]:
    """A training log as the trainer writes it, with evals every 100 lines; `awkward` adds lines a real one
    may hold: a line cut by a crash (holding the best accuracy) and an eval key nested in a value."""
    out = []
    for i in range(1, lines + 1):
        rec = {"epoch": 1 + i // 1000, "logit_scale": 14.3 + i / 1e4, "loss": 5.0 / (1 + 0.002 * i), "lr": 1e-3,
               "samples_per_second": 800.0 + i % 97, "samples_seen": 64 * i, "step": 10 * i, "time": t0 + 0.5 * i}
        if i % 100 == 0:  # accuracy peaks mid-run, loss keeps falling; n_images is a count, not a score
            rec.update({"eval/fashion/acc1": round(0.6 - abs(i - 2600) / 10_000, 4),
                        "eval/fashion/loss": round(3.0 - i / 4000, 4), "eval/fashion/n_images": 1000})
        out.append(json.dumps(rec))
    if awkward:
        out[1799] = out[1799][:60] + ', "eval/fashion/acc1": 0.97'  # no closing brace: not a record
        out[3000] = json.dumps({**json.loads(out[3000]), "extra": {"eval/fashion/acc1": 0.98}})
    return out


def expected_row(lines: list[str], spec_mtime: float, gmacs: float) -> dict:
    """The runs-table columns computed from every complete line, decoded one by one."""
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    last = records[-1]
    acc = [r["eval/fashion/acc1"] for r in records if "eval/fashion/acc1" in r]
    loss = [r["eval/fashion/loss"] for r in records if "eval/fashion/loss" in r]
    return {"samples_seen": last["samples_seen"], "step": last["step"], "epoch": last["epoch"], "loss": last["loss"],
            "samples_per_second": last["samples_per_second"], "wall_seconds": last["time"] - spec_mtime,
            "compute": gmacs * last["samples_seen"],
            "evals": {logged("fashion", "acc1"): max(acc), logged("fashion", "loss"): min(loss)}}


AWKWARD_LINES = [
    '{"x\\"eval/a/acc1": 0.999}', '{"x\\\\"eval/a/acc1": 0.9991}', '{"eval/a/acc1": 0.1, "x": {"eval/a/acc1": 0.998}}',
    '{"eval/a/acc1": 0.997, "eval/a/acc1": 0.01}', '{"eval/a/acc1": 0.996', '{"eval/a/acc1": 0.995}}',
    '[{"eval/a/acc1": 0.994}]', '{"eval/a/acc1": 0.993} x', '{"eval/a/acc1": 0.992, "s": "\\u00e9"}',
    '{"eval/a/acc1": 1e999}', '{"eval/b/loss": -1e999}', '{"eval/a/acc1": 0.991, "t": "a\x01"}',
    '{"eval/a/acc1": 0.99,}', '  {"eval/a/acc1": 0.989}\x0c ', '{"eval/a/acc1" : 0.988 , "eval/b/loss":\t0.00001}',
    '{"eval/a/acc1": 0.987, "eval/a/n_x": null}', '{"eval/a/acc1": 0.986, "k": "eval/a/acc1"}',
    '{"eval/a/acc1": 0.985, "eval/a/acc1": true}', '{"eval/\u00e9/acc1": 0.5}', '{"eval/a/acc1": NaN}',
    '{"eval/a/acc1": 1' + "0" * 400 + "}", '{"eval/b/loss": 1E-9, "eval/b/loss": 2}',
]


def test_metrics_digest_agrees_with_decoding_every_line():
    """The runs table reads best evals off the raw bytes and decodes only the best values' lines; whatever the
    log holds, it must give what decoding every complete line gives (incrementally too)."""
    import random

    from clipforge.dashboard.metrics_log import EVAL_PREFIX, MetricsDigest, lower_is_better

    def reference(data: bytes) -> tuple[dict, dict | None]:
        best, last = {}, None
        for line in data[: data.rfind(b"\n") + 1].split(b"\n"):
            try:
                rec = json.loads(line.strip())  # blanks around a line (\x0b, \x0c too) do not spoil it
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            last = rec
            for k, v in rec.items():
                name = k[len(EVAL_PREFIX):]
                if (not k.startswith(EVAL_PREFIX) or isinstance(v, bool) or not isinstance(v, (int, float))
                        or name.rsplit("/", 1)[-1].startswith("n_") or abs(v) > 1e308 or v != v):
                    continue
                sign = -1 if lower_is_better(name) else 1
                if name not in best or (v - best[name]) * sign > 0:
                    best[name] = float(v)
        return best, last

    rng = random.Random(7)
    for _trial in range(600):
        lines = []
        for i in range(rng.randint(1, 30)):
            rec = {"step": i, "loss": rng.random()}
            if rng.random() < 0.3:
                rec.update({"eval/a/acc1": round(rng.random(), 3), "eval/a/n_images": 100,
                            "eval/b/loss": round(rng.random(), 3)})
            lines.append(json.dumps(rec, separators=rng.choice([(", ", ": "), (",", ":")])))
        for _ in range(rng.choice([0, 0, 1, 2])):
            lines.insert(rng.randint(0, len(lines)), rng.choice(AWKWARD_LINES))
        data = ("\n".join(lines) + rng.choice(["\n", "", '\n{"eval/a/acc1": 0.9999'])).encode()
        whole = MetricsDigest()
        whole.feed(data)
        pieces = MetricsDigest()  # the same bytes, read as a growing file is read
        for cut in sorted(rng.sample(range(len(data)), min(3, len(data)))) + [len(data)]:
            assert pieces.continue_with(data[pieces.resume_start():cut])
        best, last = reference(data)
        assert whole.best_evals == best and whole.last == last, data
        assert pieces.best_evals == best and pieces.last == last and pieces.offset == whole.offset, data


def test_numbers_too_large_for_a_float_leave_cells_blank(tmp_path):
    """JSON integers have no size limit; one that no float can hold must not break the whole listing."""
    huge = "1" + "0" * 400
    run = tmp_path / "runs" / "huge"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(
        f'{{"step": 5, "eval/ds/acc1": {huge}, "eval/ds/acc5": 0.5}}\n{{"step": 10, "samples_seen": {huge}}}\n')
    (run / "summary.json").write_text(f'{{"gmacs": 2.0, "samples_per_second": {huge}}}')
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(
        f'{{"dataset": "tux", "model": "tiny", "task": "retrieval", "metrics": {{"r1": {huge}, "r5": 0.75}}}}')
    with serving(tmp_path / "runs") as client:
        row = rows_by_id(client)["huge"]
    assert row["evals"] == {logged("ds", "acc5"): 0.5, key("tiny", "tux", RET, "r5"): 0.75}
    assert row["samples_seen"] is None and row["compute"] is None and row["samples_per_second"] is None
    assert row["step"] == 10 and row["status"] == "finished"


def test_a_model_named_by_a_number_is_listed_without_an_estimate(tmp_path):
    from clipforge.dashboard.app import Dashboard

    run = tmp_path / "numbered"
    run.mkdir()
    (run / "spec.yaml").write_text("kind: train\nname: numbered\nmodel:\n  name: 123\ndata:\n  batch_size: 8\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    dash = Dashboard(DashboardSpec(runs=str(tmp_path), rescan_interval_s=0, estimate_compute=True))
    status, data = dash.handle(dash.runs, {})
    assert status == 200 and data["runs"][0]["model"] == 123 and data["runs"][0]["params"] is None
    assert data["estimates_pending"] == [] and data["estimate_errors"] == {}


def test_runs_list_columns_for_long_logs_with_a_half_written_line(tmp_path):
    root = tmp_path / "runs"
    (root / "sweep").mkdir(parents=True)
    (root / "sweep" / "sweep.json").write_text(json.dumps({"fields": ["optim.lr"], "children": [
        {"dir": "awkward", "values": {"optim.lr": 1e-3}}, {"dir": "clean", "values": {"optim.lr": 3e-3}}]}))
    spec_mtime = time.time() - 3000.0
    half = json.dumps({"step": 50010, "eval/fashion/acc1": 0.999, "loss": 0.01, "samples_seen": 1})[:-1]
    final = json.dumps({"step": 50020, "samples_seen": 320_128, "loss": 0.009, "epoch": 6,
                        "samples_per_second": 950.0, "time": spec_mtime + 4000})
    logs = {}
    for name in ("awkward", "clean"):
        run = root / "sweep" / name
        run.mkdir()
        (run / "spec.yaml").write_text(train_spec_yaml(f"{name}-run", str(run)))
        os.utime(run / "spec.yaml", (spec_mtime, spec_mtime))
        # Only the model's size: the other columns come from the log.
        (run / "summary.json").write_text(json.dumps({"params": 1_234_567, "gmacs": 0.25}))
        logs[name] = long_log(5000, t0=spec_mtime + 10, awkward=name == "awkward")
        (run / "metrics.jsonl").write_text("\n".join(logs[name]) + "\n" + half)

    def check(rows: dict, name: str, lines: list[str]) -> None:
        row = rows[f"sweep/{name}"]
        assert {k: row[k] for k in ("name", "sweep", "swept", "kind", "status", "model", "params")} == {
            "name": f"{name}-run", "sweep": "sweep", "swept": {"optim.lr": 1e-3 if name == "awkward" else 3e-3},
            "kind": "train", "status": "finished", "model": "tiny", "params": 1_234_567}
        for key, value in expected_row(lines, spec_mtime, 0.25).items():
            assert row[key] == pytest.approx(value), (name, key)

    with serving(root) as client:
        rows = rows_by_id(client)
        for name, lines in logs.items():
            assert expected_row(lines, spec_mtime, 0.25)["evals"] == {logged("fashion", "acc1"): 0.6,
                                                                      logged("fashion", "loss"): 1.75}
            check(rows, name, lines)
        # The trainer finishes the half-written line and logs one more: the table follows.
        for name, lines in logs.items():
            with open(root / "sweep" / name / "metrics.jsonl", "a") as f:
                f.write("}\n" + final + "\n")
            lines += [half + "}", final]
            assert expected_row(lines, spec_mtime, 0.25)["evals"][logged("fashion", "acc1")] == 0.999
        rows = rows_by_id(client)
        for name, lines in logs.items():
            check(rows, name, lines)
    with serving(root) as fresh:  # a freshly started dashboard reads the whole logs at once and agrees
        rows = rows_by_id(fresh)
        for name, lines in logs.items():
            check(rows, name, lines)


# -- one run and live metrics ----------------------------------------------------------------------

def test_run_payload_skips_corrupt_lines_and_keeps_half_line_for_later(client, runs_folder):
    status, data = client.get("/api/run", id="alpha")
    assert status == 200
    assert [r["step"] for r in data["records"]] == [5, 10, 15, 20, 25, 30]
    assert data["skipped_lines"] == 2
    text = (runs_folder / "alpha" / "metrics.jsonl").read_bytes()
    assert data["offset"] == text.rfind(b"\n") + 1  # the half-written last line is not consumed
    assert data["spec"]["kind"] == "train" and data["spec"]["model"]["name"] == "tiny"
    assert "kind: train" in data["spec_text"]
    assert data["summary"]["final_loss"] == 1.6
    assert [c["name"] for c in data["checkpoints"]] == ["epoch_0001"]
    assert data["checkpoints"][0]["id"] == "alpha/checkpoints/epoch_0001"
    assert sorted((e["dataset"], e["task"]) for e in data["evals"]) == [
        ("fashion", "zeroshot_classification"), ("tux", "retrieval")]
    assert data["evals"][0]["file"] == "alpha/eval/trained/results.json"
    assert sorted((e["model"], e["dataset"], e["task"], e["metric"], e["value"]) for e in data["eval_table"]) == [
        ("trained", "fashion", CLS, "acc1", 0.4), ("trained", "tux", RET, "image_retrieval_recall@1", 0.25),
        ("trained", "tux", RET, "text_retrieval_recall@1", 0.5)]


def test_metrics_since_offset_returns_only_new_complete_lines(client, runs_folder):
    path = runs_folder / "alpha" / "metrics.jsonl"
    _, first = client.get("/api/metrics", id="alpha", offset=0)
    offset = first["offset"]
    _, again = client.get("/api/metrics", id="alpha", offset=offset)
    assert again["records"] == [] and again["offset"] == offset and not again["reset"]
    with open(path, "a") as f:  # the trainer finishes the half-written line and starts another
        f.write(', "lr": 0.001}\n{"step": 1000')
    _, new = client.get("/api/metrics", id="alpha", offset=offset)
    assert [r["step"] for r in new["records"]] == [999] and not new["reset"]
    with open(path, "a") as f:
        f.write(', "loss": 1.1}\nnot json at all\n')
    _, newer = client.get("/api/metrics", id="alpha", offset=new["offset"])
    assert [r["step"] for r in newer["records"]] == [1000] and newer["skipped_lines"] == 1


def test_rewritten_log_tells_the_client_to_start_over(client, runs_folder):
    _, first = client.get("/api/metrics", id="live", offset=0)
    (runs_folder / "live" / "metrics.jsonl").write_text(metric_lines(1)[0] + "\n")  # a resumed run rewrote it
    _, after = client.get("/api/metrics", id="live", offset=first["offset"])
    assert after["reset"] and [r["step"] for r in after["records"]] == [5]


def test_bad_offset_is_a_400(client):
    assert client.get("/api/metrics", id="alpha", offset="abc")[0] == 400
    assert client.get("/api/metrics", id="alpha", offset=-1)[0] == 400


# -- traversal -------------------------------------------------------------------------------------

TRAVERSALS = [
    "..", "../outside/secret", "alpha/../..", "alpha/../../outside/secret", "/etc", "/", "//etc", "~/x",
    "C:/Windows", "alpha\\..\\..", "%2e%2e", "%2e%2e/outside/secret", "%252e%252e", "%252e%252e%252foutside",
    "escape", "escape/", "./alpha", "alpha//", "file:///etc",
]


@pytest.mark.parametrize("endpoint", ["/api/run", "/api/metrics"])
@pytest.mark.parametrize("value", TRAVERSALS)
def test_traversal_in_run_id_is_refused(client, endpoint, value):
    # The value is put in the query string as the attacker would type it: '%2e' decodes once to '.',
    # '%252e' decodes once to the literal '%2e'.
    status, body = client.raw(f"{endpoint}?id={value}&offset=0")
    assert status in (403, 404), (value, status, body)
    assert SECRET.encode() not in body


@pytest.mark.parametrize("value", ["..", "%2e%2e", "%252e%252e", "/tmp", "escape", "../outside"])
def test_traversal_in_scaling_group_is_refused(client, value):
    status, body = client.raw(f"/api/scaling?group={value}")
    assert status in (403, 404), (value, status)


@pytest.mark.parametrize("path", [
    "/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e/app.py", "/static/%252e%252e/app.py",
    "/static//etc/passwd", "/static/../../../../etc/passwd", "/../../etc/passwd", "/run/../../etc/passwd",
    "/static/charts.js/../../app.py",
])
def test_traversal_in_url_path_is_refused(client, path):
    status, body = client.raw(path)
    assert status == 404, (path, status)
    assert b"import" not in body and b"root:" not in body


def test_symlinks_out_of_the_folder_are_not_followed(client):
    rows = rows_by_id(client)
    assert "escape" not in rows  # the symlinked folder is not listed as a run
    status, data = client.get("/api/run", id="linked")
    assert status == 200 and data["records"] == []  # its metrics.jsonl points outside: not read
    _, listing = client.raw("/api/runs")
    assert SECRET.encode() not in listing
    status, _ = client.get("/api/run", id="escape")
    assert status == 403


@pytest.mark.parametrize("checkpoint", ["../outside/secret", "%2e%2e/x/checkpoints/y", "alpha/checkpoints/../../..",
                                        "/etc/checkpoints/x", "escape/checkpoints/x", "alpha/checkpoints/epoch_0002",
                                        "alpha/checkpoints/nope"])
def test_try_refuses_paths_outside_and_incomplete_checkpoints(client, checkpoint):
    body = json.dumps({"checkpoint": checkpoint, "image": "data:image/png;base64,AAAA", "captions": ["a"]}).encode()
    status, resp = client.raw("/api/try", "POST", body, {"Content-Type": "application/json"})
    assert status in (403, 404), (checkpoint, status, resp)


def test_unknown_run_is_404_and_foreign_host_is_refused(client):
    assert client.get("/api/run", id="notes")[0] == 404
    assert client.get("/api/run", id="nope")[0] == 404
    status, _ = client.raw("/api/runs", headers={"Host": "attacker.example:8050"})
    assert status == 403


def test_pages_and_assets_are_served(client):
    for path in ("/", "/run?id=alpha", "/compare?ids=alpha", "/scaling", "/try"):
        status, body = client.raw(path)
        assert status == 200 and b"<main" in body, path
    status, body = client.raw("/static/charts.js")
    assert status == 200 and b"drawChart" in body


# -- scaling endpoint ------------------------------------------------------------------------------

def test_scaling_endpoint_fits_the_sweep(client, runs_folder):
    status, data = client.get("/api/scaling", group="sweep", metric=logged("fashion", "acc1"), bins=4, target=0.5)
    one_bin = client.get("/api/scaling", group="sweep", metric=logged("fashion", "acc1"), bins=1)[1]
    assert one_bin["fit"] is None and "at least 2 compute bins" in one_bin["fit_error"]
    assert status == 200
    assert {p["id"] for p in data["points"]} == {"sweep/lr0", "sweep/lr1"}
    # Two runs: compute 2 GMAC x 160 and x 320 samples, errors 1 - 0.2 and 1 - 0.3.
    by_id = {p["id"]: p for p in data["points"]}
    assert by_id["sweep/lr0"]["compute"] == 320.0 and by_id["sweep/lr1"]["error"] == pytest.approx(0.7)
    assert data["frontier"] == ["sweep/lr0", "sweep/lr1"]  # 320 and 640 fall in different quarter-decade bins
    alpha = math.log(0.7 / 0.8) / math.log(640 / 320)
    assert data["fit"]["alpha"] == pytest.approx(alpha)
    assert data["target"]["compute"] == pytest.approx(320 * (0.5 / 0.8) ** (1 / alpha))
    assert client.get("/api/scaling", group="sweep", target=2)[0] == 400


# -- spec header reading ---------------------------------------------------------------------------

CLEAN_SCALARS = ["train", "tiny", "runs/demo/train", "/abs/path", "heads", "0", "7", "true", "False", "null", "~",
                 "miniclip-effnet-minilm", "_under", "ViT-B-32", "a_b.c"]
TRICKY_SCALARS = ["train", "tiny", "runs/demo/train", "/abs/path", "heads", "0", "7", "0123", "-3", "1e-3", "0.002",
                  "1.0e-06", ".inf", "yes", "no", "on", "Off", "y", "true", "False", "null", "~", "''", "'quoted: x'",
                  '"dq"', "2024-01-01", "a b c", "[1, 2]", "{a: 1}", "x # comment", "&anchor v", "!!str 12", "a:b",
                  "miniclip-effnet-minilm", "_under", "=", "0x1F", "|\n  block\n  text", ">\n  folded"]


def test_spec_yaml_index_reads_what_pyyaml_reads():
    """The runs table's spec fields of an old run (spec.yaml only), read from the head of the document, are what
    yaml.safe_load reads, for hand-written layouts with awkward values as well as clipforge's own."""
    import random

    import yaml

    from clipforge.runtime.run_dir import index_from_spec_yaml, spec_index

    rng = random.Random(1234)
    compared = 0
    for _ in range(600):
        pool = rng.choice([CLEAN_SCALARS, TRICKY_SCALARS])
        top = ["kind", "name", "storage", "seed", "resume"]
        rng.shuffle(top)
        lines = []
        for key in top[: rng.randint(2, 5)]:
            lines.append(f"{key}:" if rng.random() < 0.05 else f"{key}: {rng.choice(pool)}")
            if rng.random() < 0.05:
                lines.append("  continued plain scalar")
        pos = rng.randint(0, len(lines))
        pad = " " * rng.choice([2, 2, 2, 4])
        model = ["model:"] + [f"{pad}{k}: {rng.choice(pool)}" for k in ("name", "trainable", "init_seed")
                              if rng.random() < 0.8]
        if rng.random() < 0.5:
            model += [f"{pad}nested:", f"{pad}  deep: 1", f"{pad}items:", f"{pad}- a", f"{pad}- b", f"{pad}empty:"]
        if rng.random() < 0.05:
            model.append(f"{pad}  continued")
        if rng.random() < 0.1:
            model += [f"{pad}<<: {{trainable: merged}}"] if rng.random() < 0.5 else [f"{pad}name: *anchor"]
            lines.insert(0, "defaults: &anchor from-an-alias")
        lines[pos:pos] = model
        lines += ["data:", "  shards:", "  - x", f"extra: {rng.choice(pool)}"]
        text = "\n".join(lines) + "\n"
        try:
            full = yaml.safe_load(text)
        except yaml.YAMLError:
            continue  # a broken spec: the head may or may not show it (the run page shows the parse error)
        assert index_from_spec_yaml(text) == spec_index(full), text
        compared += 1
    # Documents as clipforge writes them (yaml.safe_dump, keys in spec order), with awkward values.
    clean = ["train", "tiny", "runs/x", "heads", "all", 0, 7, True, False, None]
    awkward = CLEAN_SCALARS + TRICKY_SCALARS + [0, 7, -3, 1e-3, 2.5, True, False, None, "", "12"]
    for _ in range(300):
        values = rng.choice([clean, awkward])
        doc = {"kind": rng.choice(values), "name": rng.choice(values), "storage": rng.choice(values),
               "model": {k: rng.choice(values) for k in ("name", "checkpoint", "trainable", "init_seed")},
               "data": {"shards": ["x"], "batch_size": 8}}
        text = yaml.safe_dump(doc, sort_keys=False)
        index = index_from_spec_yaml(text)
        assert index == spec_index(yaml.safe_load(text)) == {
            "kind": doc["kind"], "name": doc["name"],
            "model": {"name": doc["model"]["name"], "trainable": doc["model"]["trainable"]}}, text
        # Reading stops after the model section: what follows it is never parsed.
        assert index_from_spec_yaml(text + "broken: [\n") == index
        compared += 1
    assert compared > 400


def test_old_and_new_runs_fill_the_table_alike(tmp_path):
    """A run with run.json and the same run with only spec.yaml (written before run.json existed) give the same
    row; a run.json that is half-written or another tool's leaves the columns to spec.yaml."""
    root = tmp_path / "runs"
    summary = {"steps": 30, "samples_seen": 240, "wall_seconds": 42.0, "params": 10, "gmacs": 2.0}
    with_index = {"new": True, "old": False, "half": True, "foreign": True, "index-only": True}
    for rel, index in with_index.items():
        run = write_run(root, rel, steps=4, summary=summary, model="tiny-model", index=index)
        (run / "spec.yaml").write_text(train_spec_yaml("same-name", str(run), "tiny-model"))
        if index:
            written = json.loads((run / "run.json").read_text())
            assert written == {"index_version": 1, "kind": "train", "name": rel,
                               "model": {"name": "tiny-model", "trainable": "all"}}
            (run / "run.json").write_text(json.dumps({**written, "name": "same-name"}))  # the name spec.yaml has
    (root / "half" / "run.json").write_text('{"index_version": 1, "kind": "train", "na')
    (root / "foreign" / "run.json").write_text(json.dumps({"name": "not clipforge's", "kind": "other"}))
    (root / "index-only" / "spec.yaml").unlink()
    for run in root.iterdir():
        for f in run.iterdir():
            os.utime(f, (1.7e9, 1.7e9))
    with serving(root) as client:
        rows = rows_by_id(client)
    assert rows["new"]["name"] == "same-name" and rows["new"]["model"] == "tiny-model"
    assert rows["new"]["kind"] == "train" and rows["new"]["trainable"] == "all"
    for rel in with_index:
        assert {k: v for k, v in rows[rel].items() if k not in ("id", "dir")} == {
            k: v for k, v in rows["new"].items() if k not in ("id", "dir")}, rel


# -- fsspec folder ---------------------------------------------------------------------------------

def test_fsspec_folder_is_listed_and_read(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/dash-{os.getpid()}-{time.monotonic_ns()}"
    local = tmp_path / "mem"
    write_run(local, "a", steps=3, corrupt=True, summary={"samples_seen": 24, "params": 5, "gmacs": 1.0},
              evals={"ds/acc1": [0.1, 0.3, None]})
    write_run(local, "grp/b", steps=2)
    for path in local.rglob("*"):
        if path.is_file():
            fs.pipe(f"{base}/{path.relative_to(local).as_posix()}", path.read_bytes())
    try:
        with serving(f"memory://{base}") as c:
            rows = rows_by_id(c)
            assert set(rows) == {"a", "grp/b"}
            assert rows["a"]["status"] == "finished" and rows["a"]["compute"] == 24.0
            assert rows["a"]["evals"] == {logged("ds", "acc1"): 0.3}
            assert rows["grp/b"]["sweep"] is None and rows["grp/b"]["folder"] == "grp"  # no sweep.json: a folder
            status, data = c.get("/api/run", id="a")
            assert status == 200 and [r["step"] for r in data["records"]] == [5, 10, 15] and data["skipped_lines"] == 2
            assert c.get("/api/run", id="../x")[0] == 403
    finally:
        fs.rm(base, recursive=True)


# -- command line ----------------------------------------------------------------------------------

def test_cli_command_is_registered_and_names_a_missing_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from clipforge.cli.dashboard import register

    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command, so that `dashboard` is addressed by name as in clipforge's CLI
        pass

    runner = CliRunner()
    result = runner.invoke(app, ["dashboard", "--help"])
    assert result.exit_code == 0 and "--runs" in result.output and "--port" in result.output
    missing = tmp_path / "no-such-runs"
    result = runner.invoke(app, ["dashboard", "--runs", str(missing)])
    assert result.exit_code == 2
    assert "no-such-runs" in result.output and "does not exist" in result.output
    result = runner.invoke(app, ["dashboard", "--runs", str(tmp_path), "--port", "70000"])
    assert result.exit_code == 2 and "port" in result.output


# -- compute estimates -----------------------------------------------------------------------------

def tiny_macs_by_hand() -> int:
    """Multiply-accumulates of one (image, caption) forward pass of the `tiny` config, counted by hand."""
    cfg = json.loads((Path(__file__).resolve().parents[2] / "clipforge/models/configs/tiny.json").read_text())
    v, t, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]

    def transformer(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
        qkv, out = tokens * width * 3 * width, tokens * width * width
        attention = 2 * tokens * tokens * width  # scores and the weighted sum of values
        mlp = 2 * tokens * width * int(width * mlp_ratio)
        return layers * (qkv + attention + out + mlp)

    patches = (v["image_size"] // v["patch_size"]) ** 2
    image = patches * 3 * v["patch_size"] ** 2 * v["width"]  # patch embedding
    image += transformer(patches + 1, v["width"], v["layers"], v["mlp_ratio"]) + v["width"] * embed
    text = transformer(t["context_length"], t["width"], t["layers"], t["mlp_ratio"]) + t["width"] * embed
    return image + text


def test_model_cost_matches_a_hand_count_and_fills_the_runs_table(tmp_path):
    from clipforge.dashboard.app import Dashboard
    from clipforge.dashboard.model_cost import ModelCosts

    costs = ModelCosts(enabled=True)
    write_run(tmp_path, "tiny-run", steps=3, summary={"samples_seen": 1000})
    dash = Dashboard(DashboardSpec(runs=str(tmp_path), rescan_interval_s=0), costs=costs)
    row = dash.index.row("tiny-run")
    assert row["params"] is None and row["compute"] is None  # not known yet: the estimate runs in the background
    assert costs.wait(600), costs.errors()
    cost = costs.get("tiny")
    assert cost.gmacs * 1e9 == pytest.approx(tiny_macs_by_hand(), rel=1e-9)
    assert cost.params > 3_000_000  # mostly the 49,408 x 64 token embedding
    _, data = dash.handle(dash.runs, {})
    row = data["runs"][0]
    assert row["params"] == cost.params and row["gmacs"] == cost.gmacs
    assert row["compute"] == pytest.approx(cost.gmacs * 1000)
    # Config paths named by a run are never built.
    assert costs.get("/etc/some-config.json") is None and costs.pending() == []
