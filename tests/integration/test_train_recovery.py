"""Fault tolerance: a Ray Train worker killed with SIGKILL mid-run; the run still ends exactly at its budget.

Ray Train replaces the whole worker group (`max_failures`), and the loop resumes from the newest
checkpoint. The metrics log must read as one run: every step once, in order, with `restarts`
telling which lines came after the resume.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipforge.train.monitoring import worker_file
from clipforge.train.trainer import run_train

from train_fixtures import killing_rank_after_step, read_lines, step_lines, train_spec, write_shards

BUDGET, EVERY, KILL_AFTER = 40, 4, 10


@pytest.mark.timeout(900)
def test_a_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(ray_local, tmp_path):
    torch.set_num_threads(1)
    write_shards(tmp_path / "data", [16, 16])
    spec = train_spec(str(tmp_path / "run"), [str(tmp_path / "data")], max_failures=1, tensorboard=True,
                      optim={"steps": BUDGET}, checkpoint={"every_steps": EVERY, "keep_last": BUDGET})
    run = Path(spec.storage)
    with killing_rank_after_step(run, rank=1, after_step=KILL_AFTER) as killed:
        summary = run_train(spec, progress=False)

    assert killed and KILL_AFTER <= killed["step"] < BUDGET, killed
    assert summary["steps"] == BUDGET and summary["samples_seen"] == BUDGET * 8 and summary["restarts"] == 1
    resumed_at = json.loads((Path(summary["resumed_from"]) / "meta.json").read_text())["step"]
    # The newest checkpoint before the kill (or the one being written as it happened).
    assert resumed_at % EVERY == 0 and killed["step"] - EVERY <= resumed_at <= killed["step"] + EVERY, resumed_at
    lines = step_lines(read_lines((run / "metrics.jsonl").read_text()))
    assert [m["step"] for m in lines] == list(range(1, BUDGET + 1))  # no step twice, none missing
    assert [m["restarts"] for m in lines] == [0] * resumed_at + [1] * (BUDGET - resumed_at)
    # TensorBoard hides what the cut-off attempt logged after the resume step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, BUDGET + 1))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([m["loss"] for m in lines])
    # Rank 1 is a new process now.
    assert json.loads(Path(worker_file(str(run), 1)).read_text())["pid"] != killed["pid"]
    assert json.loads((run / "summary.json").read_text())["steps"] == BUDGET
