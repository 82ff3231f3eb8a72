"""A training run whose workers Ray cannot place fails after `scaling.placement_timeout_s`, saying what it asked for
and what the cluster has, instead of waiting forever; while it waits it logs what for and how long.

On one local Ray of 2 CPUs: 2 workers of 1.5 CPUs (each fits the node, both do not: raise the limit or add nodes),
in-process; 2 workers of 3 CPUs (no node can hold one), through the command line in a fresh process.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from clipforge.errors import EXIT_FAILED, UserError
from clipforge.train.placement import WorkersNotPlaced
from clipforge.train.trainer import run_train

from train_fixtures import train_spec, write_shards

TIMEOUT_S = 3
# From the first "waiting" line to the failure: the rest of the limit, then Ray Train's controller shuts down and
# reports (seconds; tens of seconds on a busy 2-core machine). Ray Train alone would retry without end.
SLACK_S = 60


def test_workers_that_do_not_fit_together_fail_after_the_limit(ray_local, tmp_path, caplog):
    write_shards(tmp_path / "data", [8, 8])
    spec = train_spec(str(tmp_path / "run"), [str(tmp_path / "data")],
                      scaling={"workers": 2, "cpus_per_worker": 1.5, "placement_timeout_s": TIMEOUT_S})
    t0 = time.time()
    with caplog.at_level(logging.WARNING, logger="clipforge.train.placement"):
        with pytest.raises(WorkersNotPlaced) as failure:
            run_train(spec, progress=False)
    failed_at = time.time()

    message = str(failure.value)
    assert isinstance(failure.value, UserError) and failure.value.exit_code == EXIT_FAILED
    assert "\n" not in message
    assert message.startswith("training `run` could not place 2 workers of {CPU: 1.5} for 3 s (scaling."
                              "placement_timeout_s); the cluster has 1 live node with {CPU: 2} in all"), message
    assert message.endswith("raise scaling.placement_timeout_s or add nodes"), message
    waiting = [r for r in caplog.records if "is waiting for Ray to place" in r.getMessage()]
    assert waiting, caplog.text
    assert waiting[0].getMessage().startswith("training `run` is waiting for Ray to place 2 workers of {CPU: 1.5}: ")
    assert "gives up after 3 s (scaling.placement_timeout_s)" in waiting[0].getMessage()
    # The first line comes after a second of waiting, the failure after the limit.
    assert t0 + 1 <= waiting[0].created and failed_at - waiting[0].created < TIMEOUT_S + SLACK_S
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_worker_larger_than_any_node_fails_through_the_command_line(tmp_path):
    write_shards(tmp_path / "data", [8, 8])
    spec = train_spec(str(tmp_path / "run"), [str(tmp_path / "data")],
                      scaling={"workers": 2, "cpus_per_worker": (os.cpu_count() or 1) + 1,
                               "placement_timeout_s": TIMEOUT_S})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "clipforge", "run", str(spec_file)], capture_output=True, text=True,
                       env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    ended_at = time.time()

    assert r.returncode == EXIT_FAILED, (r.returncode, r.stderr[-4000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    cpus = f"{(os.cpu_count() or 1) + 1:g}"
    assert len(errors) == 1 and errors[0].startswith(
        f"error: training `run` could not place 2 workers of {{CPU: {cpus}}} for 3 s (scaling.placement_timeout_s)"
    ), r.stderr[-4000:]
    assert "no node has what one worker asks for" in errors[0], errors[0]
    waiting = [line for line in r.stderr.splitlines() if "is waiting for Ray to place 2 workers" in line]
    assert waiting, r.stderr[-4000:]
    # The log line's time (local time, as logging writes it) to the end: the limit, then the shutdown of Ray.
    first_waiting = datetime.strptime(waiting[0][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert ended_at - first_waiting < TIMEOUT_S + SLACK_S + 30, waiting[0]
