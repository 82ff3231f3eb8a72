"""Monitoring a run: evaluations during training, metrics fields, TensorBoard events, the driver's progress bar."""
from __future__ import annotations

import fcntl
import io
import json
import os
import select
import struct
import termios
import time
from pathlib import Path

import pytest
import torch

from clipforge.dashboard.app import Dashboard
from clipforge.dashboard.metrics_log import MetricsDigest
from clipforge.dashboard.spec import DashboardSpec
from clipforge.eval.evaluator import run_eval
from clipforge.eval.spec import EvalSpec
from clipforge.train.monitoring import worker_file
from clipforge.train.progress import MetricsProgress
from clipforge.train.trainer import run_train

from train_fixtures import read_lines, step_lines, train_spec, write_eval_sets, write_shards


@pytest.mark.timeout(900)
def test_periodic_eval_metrics_fields_and_tensorboard(ray_local, tmp_path, capsys):
    torch.set_num_threads(1)
    write_shards(tmp_path / "data", [16, 16])
    shard, folder = write_eval_sets(tmp_path / "eval")
    tasks = [{"task": "retrieval", "dataset": "val", "shards": [str(shard)], "recall_k": [1, 5]},
             {"task": "zeroshot_classification", "dataset": "colours", "image_folder": str(folder),
              "templates": ["a photo of {c}.", "a {c} thing"]}]
    spec = train_spec(str(tmp_path / "run"), [str(tmp_path / "data")], optim={"steps": 6}, log_every_steps=2,
                      eval_every_steps=3, eval_tasks=tasks, tensorboard=True, eval_batch_size=4)
    run = Path(spec.storage)
    summary = run_train(spec)  # stdout is not a terminal here: no progress bar
    assert summary["steps"] == 6
    assert "step/s" not in capsys.readouterr().out
    _check_run_index(run)

    lines = read_lines((run / "metrics.jsonl").read_text())
    assert [m["step"] for m in step_lines(lines)] == [2, 3, 4, 6]  # every 2nd step, plus the evaluated ones
    evals = {m["step"]: {k: v for k, v in m.items() if k.startswith("eval/")} for m in lines}
    assert [s for s, e in evals.items() if e] == [3, 6]
    expected_keys = {"eval/val/image_retrieval_recall@1", "eval/val/text_retrieval_recall@5", "eval/val/n_images",
                     "eval/colours/acc1", "eval/colours/mean_per_class_recall", "eval/colours/n_classes"}
    assert expected_keys <= set(evals[6]) and "eval/colours/acc5" not in evals[6]  # 3 classes: acc5 undefined
    assert evals[6]["eval/val/n_images"] == 10 and evals[6]["eval/val/n_texts"] == 14
    for m in step_lines(lines):
        assert 0 <= m["data_wait"] and 0 <= m["data_wait_fraction"] <= 1
        assert m["memory_rss"] > 50 * 2**20 and m["restarts"] == 0

    # The evaluation inside training (each rank embedding half the images) equals the eval job on the
    # final checkpoint (Ray Data).
    job = run_eval(EvalSpec.model_validate({
        "kind": "eval", "storage": str(tmp_path / "evaljob"), "tasks": tasks,
        "model": {"name": "tiny", "checkpoint": str(run)}, "scaling": {"workers": 2, "cpus_per_worker": 0.5}}))
    for result in job:
        for k, v in result["metrics"].items():
            key = f"eval/{result['dataset']}/{k}"
            if key in evals[6]:
                assert evals[6][key] == pytest.approx(v, abs=1e-6), key

    # The dashboard reads the eval lines as this run's eval results.
    digest = MetricsDigest()
    digest.feed((run / "metrics.jsonl").read_bytes())
    assert digest.best_evals["val/image_retrieval_recall@1"] == max(e["eval/val/image_retrieval_recall@1"]
                                                                    for e in evals.values() if e)
    assert digest.last["step"] == 6 and "loss" in digest.last

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 3, 4, 6]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([m["loss"] for m in step_lines(lines)])
    assert [e.step for e in events.Scalars("eval/colours/acc1")] == [3, 6]
    assert "data_wait_fraction" in events.Tags()["scalars"] and "memory_rss" in events.Tags()["scalars"]


def _check_run_index(run: Path) -> None:
    """The run's index run.json holds the spec fields of the dashboard's runs table, and the table reads the same
    from it as from spec.yaml alone (how runs written before run.json existed are read)."""
    assert json.loads((run / "run.json").read_text()) == {
        "index_version": 1, "kind": "train", "name": "run", "model": {"name": "tiny", "trainable": "all"}}

    def table_row() -> dict:
        spec = DashboardSpec(runs=str(run.parent), rescan_interval_s=0, estimate_compute=False)
        row = Dashboard(spec).index.row("run")
        return {k: row[k] for k in ("name", "kind", "model", "trainable", "status", "step", "wall_seconds")}

    with_index = table_row()
    assert with_index["wall_seconds"] > 0 and {k: v for k, v in with_index.items() if k != "wall_seconds"} == {
        "name": "run", "kind": "train", "model": "tiny", "trainable": "all", "status": "finished", "step": 6}
    index = (run / "run.json").read_bytes()
    (run / "run.json").unlink()
    try:
        assert table_row() == with_index
    finally:
        (run / "run.json").write_bytes(index)


def _write_progress(run: Path, steps: range, total: int) -> None:
    Path(worker_file(str(run), 0)).parent.mkdir(parents=True, exist_ok=True)
    Path(worker_file(str(run), 0)).write_text(json.dumps({"rank": 0, "pid": 1, "total_steps": total}))
    with open(run / "metrics.jsonl", "a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 2.0 / s, "samples_per_second": 12.5, "restarts": 0}) + "\n")


def _read_terminal(fd: int, wait: float = 2.0) -> str:
    out, deadline = b"", time.monotonic() + wait
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            out += os.read(fd, 65536)
    return out.decode(errors="replace")


def test_progress_bar_follows_the_log_on_a_terminal_and_stays_quiet_elsewhere(tmp_path):
    run = tmp_path / "run"
    _write_progress(run, range(1, 8), total=10)
    quiet = io.StringIO()
    with MetricsProgress(str(run), "quiet", stream=quiet, poll_seconds=0.05) as bar:
        time.sleep(0.2)
    assert quiet.getvalue() == "" and bar.bar is None

    master, slave = os.openpty()
    # A terminal window of 24 x 120 characters (a fresh pty reports 0 x 0).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    with os.fdopen(slave, "w") as terminal:
        with MetricsProgress(str(run), "demo", stream=terminal, poll_seconds=0.05):
            shown = _read_terminal(master)
            assert "demo" in shown and "7/10" in shown and "loss=0.2857" in shown
            # A line cut off mid-write is ignored until it is whole.
            with open(run / "metrics.jsonl", "a") as f:
                f.write('{"step": 8, "lo')
            _write_progress(run, range(9, 10), total=10)
            time.sleep(0.3)
            _write_progress(run, range(10, 11), total=10)
        shown = _read_terminal(master, 0.5)
    os.close(master)
    assert "10/10" in shown and "loss=0.2000" in shown
