"""Staged fine-tuning: the whole model for two steps, then only each tower's last block and head.

On 2 real Ray Train workers with DDP, whose wrapper must be rebuilt when the trainable set changes.
Checkpoints after every step show what moved when; a run resumed inside the second stage must
apply that stage's regime from its first step.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clipforge.models import ModelSpec, create_model
from clipforge.models.checkpoint_files import load_model_state
from clipforge.models.regimes import trainable_names
from clipforge.train.loop import train_worker
from clipforge.train.trainer import run_train

from train_fixtures import read_lines, step_lines, train_spec, write_shards

LAST_BLOCKS = {"image": {"last_blocks": 1}, "text": {"last_blocks": 1}}
STAGES = [{"until_step": 2, "trainable": "all"}, {"trainable": LAST_BLOCKS}]


def _spec(root: Path, name: str, shard: Path, **over):
    raw = {
        "model": {"name": "tiny", "trainable": STAGES},
        "optim": {"epochs": 2, "lr": 2e-3, "warmup_steps": 1},
        "data": {"augment": {"crop_scale": [1.0, 1.0]}},
        "checkpoint": {"every_epochs": 1, "every_steps": 1, "keep_last": 10},
    }
    raw.update(over)
    return train_spec(str(root / name), [str(shard)], **raw)


def _losses(run: Path) -> list[float]:
    return [m["loss"] for m in step_lines(read_lines((run / "metrics.jsonl").read_text()))]


@pytest.mark.timeout(600)
def test_switch_to_last_blocks_freezes_the_rest_and_resume_keeps_the_stage(tmp_path, ray_local):
    torch.set_num_threads(1)
    (shard,) = write_shards(tmp_path / "data", [24])
    spec = _spec(tmp_path, "staged", shard)
    run_train(spec)
    ckpts = tmp_path / "staged" / "checkpoints"
    # 3 steps per epoch: step_* part-way, epoch_* at the ends of epochs.
    names = {1: "step_00000001", 2: "step_00000002", 3: "epoch_0001", 4: "step_00000004", 6: "epoch_0002"}
    states = {step: load_model_state(str(ckpts / name)) for step, name in names.items()}
    initial = create_model(ModelSpec(name="tiny")).model
    start = initial.state_dict()
    second = set(trainable_names(initial, {"image": LAST_BLOCKS["image"], "text": LAST_BLOCKS["text"]}))
    frozen = [k for k in start if k not in second]
    assert any(".resblocks.0." in k for k in frozen) and "logit_scale" in second
    assert any(".resblocks.1." in k for k in second) and "visual.proj" in second

    # Stage 1 (steps 1-2) trains everything, the early blocks included.
    assert all(not torch.equal(states[2][k], start[k]) for k in frozen if k.endswith("weight")), "stage 1 trains all"
    # Stage 2 (steps 3-6): what it freezes stays bit-identical, through the DDP rebuild and the epoch change.
    for step in (3, 4, 6):
        assert all(torch.equal(states[step][k], states[2][k]) for k in frozen), step
    moved = [k for k in second if not torch.equal(states[6][k], states[2][k])]
    assert len(moved) == len(second), set(second) - set(moved)
    losses = _losses(tmp_path / "staged")
    assert len(losses) == 6 and losses[3] < losses[0]

    # Resumed after step 3 (inside stage 2) in one process with the same global batch: the stage-2 regime
    # applies from the first resumed step, and the run continues as the uninterrupted one did.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts / "epoch_0001", resumed / "checkpoints" / "epoch_0001")
    train_worker(_spec(tmp_path, "resumed", shard, scaling={"workers": 1}))
    after = load_model_state(str(resumed / "checkpoints" / "epoch_0002"))
    assert all(torch.equal(after[k], states[2][k]) for k in frozen)
    assert _losses(resumed) == pytest.approx(losses[3:], abs=2e-4)
