"""Which spec changes a re-run of a train spec may make on its own, and what it is told otherwise (no Ray, no torch
training: the run directories here hold checkpoints' meta.json only, which is what the decision reads)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipforge.runtime.run_dir import append_spec_history, read_spec_history
from clipforge.train.rerun import (
    MAY_CHANGE,
    RerunOptionError,
    RunSpecChanged,
    binding_changes,
    fresh_folder,
    may_change,
    plan_rerun,
    record_spec,
    spec_changes,
)

from spec_fixtures import TRAIN_YAML
from train_fixtures import train_spec


def _fields(run: Path, **over) -> dict:
    return train_spec(str(run), ["/data/part-00000.tar"], **over).model_dump(mode="json")


def _run_dir(storage: Path, spec_fields: dict, step: int = 6, epoch: int = 2) -> None:
    """A run directory whose newest checkpoint records `spec_fields` (as a trained one does)."""
    ckpt = storage / "checkpoints" / f"epoch_{epoch:04d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "epoch": epoch, "spec": spec_fields}))


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (os.stat(p).st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_changes_are_listed_as_dotted_fields_with_both_values(tmp_path):
    old = _fields(tmp_path / "run")
    new = _fields(tmp_path / "run", optim={"lr": 1e-4}, model={"name": "tiny", "trainable": "heads"})
    lines = [c.line() for c in spec_changes(old, new)]
    assert lines == ["model.trainable: \"all\" -> \"heads\"", "optim.lr: 0.002 -> 0.0001"]
    assert [c.line() for c in binding_changes(old, new)] == lines


@pytest.mark.parametrize("over", [
    {"optim": {"epochs": 5}},
    {"optim": {"epochs": None, "steps": 40}},
    {"log_every_steps": 7},
    {"tensorboard": True},
    {"debug": {"log_sample_keys": True}},
    {"checkpoint": {"every_epochs": 3, "keep_last": 9, "every_steps": 2}},
    {"max_failures": 2},
    {"scaling": {"workers": 2, "cpus_per_worker": 0.5, "placement_timeout_s": 30}},
    {"strategy": "fsdp2"},
    {"data": {"loader_workers": 2}},
])
def test_budget_logging_and_placement_may_change(tmp_path, over):
    old = _fields(tmp_path / "run")
    new = _fields(tmp_path / "run", **over)
    assert spec_changes(old, new), "the override changes something"
    assert binding_changes(old, new) == []


@pytest.mark.parametrize("over, field", [
    ({"optim": {"lr": 1e-4}}, "optim.lr"),
    ({"seed": 3}, "seed"),
    ({"data": {"batch_size": 16}}, "data.batch_size"),
    ({"data": {"shuffle_buffer": 5}}, "data.shuffle_buffer"),
    ({"scaling": {"workers": 1}}, "scaling.workers"),
    ({"precision": "amp_bf16"}, "precision.mode"),
    ({"name": "another"}, "name"),
])
def test_what_training_depends_on_is_binding(tmp_path, over, field):
    old = _fields(tmp_path / "run")
    assert [c.field for c in binding_changes(old, _fields(tmp_path / "run", **over))] == [field]


def test_a_moved_run_directory_is_the_same_run(tmp_path):
    assert binding_changes(_fields(tmp_path / "run"), _fields(tmp_path / "moved" / "run")) == []


def test_the_free_fields_are_named_with_a_reason_and_match_whole_sections_only():
    assert all(reason for reason in MAY_CHANGE.values())
    assert may_change("checkpoint.keep_last") and may_change("optim.epochs")
    assert not may_change("optim.epochs_extra") and not may_change("optim.lr") and not may_change("parallel")


def test_a_record_missing_fields_added_since_compares_with_their_defaults(tmp_path):
    new = _fields(tmp_path / "run")
    old = {k: v for k, v in new.items() if k not in ("debug", "eval_batch_size")}
    old["optim"] = {k: v for k, v in new["optim"].items() if k != "state_dtype"}
    assert binding_changes(old, new) == []


def test_drift_is_refused_with_each_field_and_both_ways_out_and_nothing_written(tmp_path):
    run = tmp_path / "run"
    _run_dir(run, _fields(run))
    before = _snapshot(tmp_path)
    new = train_spec(str(run), ["/data/part-00000.tar"], optim={"lr": 1e-4, "epochs": 9}, seed=4)
    with pytest.raises(RunSpecChanged) as refused:
        plan_rerun(new)
    message = str(refused.value)
    assert "optim.lr: 0.002 -> 0.0001" in message and "seed: 0 -> 4" in message
    assert "optim.epochs" not in message  # the budget may change
    assert "--resume" in message and f"--fresh to train from scratch into {run}-2" in message
    assert refused.value.exit_code == 2
    assert _snapshot(tmp_path) == before


def test_resume_accepts_drift_and_fresh_picks_the_first_free_sibling(tmp_path):
    run = tmp_path / "run"
    _run_dir(run, _fields(run))
    new = train_spec(str(run), ["/data/part-00000.tar"], optim={"lr": 1e-4, "epochs": 9})
    assert plan_rerun(new, "resume") is new
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "mine.txt").write_text("someone's")
    (tmp_path / "run-3").mkdir()  # empty: free
    assert plan_rerun(new, "fresh").storage == str(tmp_path / "run-3")
    assert fresh_folder(str(tmp_path / "new")) == str(tmp_path / "new-2")
    with pytest.raises(RerunOptionError, match="resume: false"):
        plan_rerun(new.model_copy(update={"resume": False}), "resume")


def test_the_history_is_compared_before_the_checkpoint_and_records_each_new_spec_once(tmp_path):
    run = tmp_path / "run"
    first = _fields(run)
    _run_dir(run, first)
    changed = train_spec(str(run), ["/data/part-00000.tar"], optim={"lr": 1e-4})
    # A run directory written before the history: its checkpoint's spec is recorded first, from step 0.
    record_spec(changed, 6, {"spec": first})
    record_spec(changed, 6, {"spec": first})  # a restart after a failure: the same spec, nothing added
    history = read_spec_history(str(run))
    assert [(e["start_step"], e["spec"]["optim"]["lr"]) for e in history] == [(0, 0.002), (6, 1e-4)]
    assert history[1]["changed"] == ["optim.lr: 0.002 -> 0.0001"] and history[1]["time"] > 0
    # The newest history entry is the recorded spec now, although the checkpoint was trained at 2e-3.
    assert plan_rerun(changed) is changed
    with pytest.raises(RunSpecChanged, match=r"optim.lr: 0.0001 -> 0.002"):
        plan_rerun(train_spec(str(run), ["/data/part-00000.tar"]))
    append_spec_history(str(run), {"start_step": 6, "time": 1.0, "spec": first, "changed": []})
    assert len(read_spec_history(str(run))) == 3


def _run_command(*args: str):
    from typer.testing import CliRunner

    from clipforge.cli import app

    return CliRunner().invoke(app, ["run", *args])


def test_resume_and_fresh_exclude_each_other_and_apply_to_train_specs_only(tmp_path):
    train = tmp_path / "train.yaml"
    train.write_text(TRAIN_YAML.replace("/tmp/run", str(tmp_path / "run")))
    both = _run_command(str(train), "--resume", "--fresh")
    assert both.exit_code == 2 and "--resume and --fresh exclude each other" in both.output
    evaluation = tmp_path / "eval.yaml"
    evaluation.write_text(f"kind: eval\nstorage: {tmp_path / 'out'}\nmodel: {{name: tiny}}\ntasks:\n"
                          "  - {task: retrieval, dataset: d, shards: [/tmp/shards]}\n")
    wrong_kind = _run_command(str(evaluation), "--fresh")
    assert wrong_kind.exit_code == 2 and "--fresh applies to train specs only" in wrong_kind.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
