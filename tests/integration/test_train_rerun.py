"""Running a finished train spec again: a changed spec is refused before Ray starts, unless --resume (continue,
recorded in the spec history) or --fresh (a new folder beside the old one); a run that already holds its budget
trains nothing and writes nothing; a larger budget trains on.

One tiny real run (1 worker, 2 steps per epoch) is trained once and copied into each test's own folder. The refused
and finished re-runs go through the command line with RAY_ADDRESS pointing at a port where no Ray listens: had
they started or joined Ray, they would fail instead of exiting 2 or 0.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clipforge.runtime.run_dir import read_spec_history, read_summary
from clipforge.train.spec import TrainSpec
from clipforge.train.trainer import run_train

from train_fixtures import read_lines, step_lines, train_spec, write_shards

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 2  # 16 samples, global batch 8


def _spec(storage: Path, shards: Path, **over) -> TrainSpec:
    raw = {"optim": {"epochs": 1}, "scaling": {"workers": 1, "cpus_per_worker": 1}}
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return train_spec(str(storage), [str(shards)], **raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    """(run directory, shards) of a finished one-epoch run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rerun")
    (shard,) = write_shards(root / "data", [16])
    run = root / "run"
    assert run_train(_spec(run, shard), progress=False)["steps"] == STEPS_PER_EPOCH
    return run, shard


def _copy(trained: tuple[Path, Path], into: Path) -> tuple[Path, Path]:
    run, shard = trained
    shutil.copytree(run, into / "run")
    return into / "run", shard


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its modification time (ns) and bytes."""
    return {str(p.relative_to(folder)): (os.stat(p).st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli_without_ray(spec: TrainSpec, spec_file: Path, *args: str) -> subprocess.CompletedProcess:
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "RAY_AUTH_MODE": "disabled"}  # port 9: nothing listens
    return subprocess.run([sys.executable, "-m", "clipforge", "run", str(spec_file), *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)


def _steps(run: Path) -> list[int]:
    return [m["step"] for m in step_lines(read_lines((run / "metrics.jsonl").read_text()))]


@pytest.mark.timeout(600)
def test_a_changed_spec_is_refused_with_the_field_diff_before_ray_and_changes_nothing(trained, tmp_path):
    run, shard = _copy(trained, tmp_path)
    before = _files(tmp_path)
    r = _cli_without_ray(_spec(run, shard), tmp_path / "spec.yaml", "optim.lr=1e-4", "seed=3")
    assert r.returncode == 2, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, r.stderr
    assert "optim.lr: 0.002 -> 0.0001" in error[0] and "seed: 0 -> 3" in error[0]
    assert "--resume" in error[0] and f"--fresh to train from scratch into {run}-2" in error[0]
    assert _files(tmp_path) == {**before, "spec.yaml": _files(tmp_path)["spec.yaml"]}  # only the spec file written
    assert not (tmp_path / "run-2").exists()


@pytest.mark.timeout(600)
def test_a_finished_run_trains_nothing_writes_nothing_and_starts_no_ray(trained, tmp_path):
    run, shard = _copy(trained, tmp_path)
    spec_file = tmp_path / "specs" / "spec.yaml"
    spec_file.parent.mkdir()
    before = _files(run)
    # Logging cadence may change without a flag; still nothing to train.
    r = _cli_without_ray(_spec(run, shard), spec_file, "log_every_steps=5")
    assert r.returncode == 0, r.stderr
    said = [line for line in (r.stdout + r.stderr).splitlines() if "nothing to train" in line]
    assert len(said) == 1 and r.stdout == "", r.stdout + r.stderr
    assert str(run) in said[0] and f"step {STEPS_PER_EPOCH}, epoch 1" in said[0]
    assert "raise optim.epochs above 1" in said[0]
    assert _files(run) == before


@pytest.mark.timeout(600)
def test_a_larger_budget_trains_on_and_is_recorded(trained, tmp_path):
    run, shard = _copy(trained, tmp_path)
    summary = run_train(_spec(run, shard, optim={"epochs": 2}), progress=False)
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["resumed_from"].endswith("epoch_0001")
    assert _steps(run) == [1, 2, 3, 4]
    history = read_spec_history(str(run))
    assert [(e["start_step"], e["spec"]["optim"]["epochs"]) for e in history] == [(0, 1), (STEPS_PER_EPOCH, 2)]
    assert "optim.epochs: 1 -> 2" in history[1]["changed"]


@pytest.mark.timeout(600)
def test_resume_accepts_a_changed_spec_and_records_it_as_a_new_entry(trained, tmp_path):
    run, shard = _copy(trained, tmp_path)
    changed = _spec(run, shard, optim={"lr": 1e-4, "epochs": 2})
    summary = run_train(changed, progress=False, rerun="resume")
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["resumed_from"].endswith("epoch_0001")
    history = read_spec_history(str(run))
    assert [(e["start_step"], e["spec"]["optim"]["lr"]) for e in history] == [(0, 2e-3), (STEPS_PER_EPOCH, 1e-4)]
    assert "optim.lr: 0.002 -> 0.0001" in history[1]["changed"] and history[1]["time"] > 0
    assert yaml.safe_load((run / "spec.yaml").read_text())["optim"]["lr"] == 1e-4
    # Run again as it now stands: the run holds its budget under the recorded spec, nothing to train.
    again = run_train(changed, progress=False)
    assert again == read_summary(str(run)) and getattr(again, "nothing_trained", False)


@pytest.mark.timeout(600)
def test_fresh_trains_from_scratch_into_a_new_folder_and_keeps_the_old_one(trained, tmp_path):
    run, shard = _copy(trained, tmp_path)
    before = _files(run)
    summary = run_train(_spec(run, shard, optim={"lr": 1e-4}), progress=False, rerun="fresh")
    fresh = tmp_path / "run-2"
    assert summary["resumed_from"] is None and summary["checkpoint"] == str(fresh / "checkpoints" / "epoch_0001")
    assert _steps(fresh) == [1, 2]
    assert [e["spec"]["optim"]["lr"] for e in read_spec_history(str(fresh))] == [1e-4]
    assert _files(run) == before
