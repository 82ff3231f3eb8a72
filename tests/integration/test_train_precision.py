"""Precision modes, the gradient scaler, bf16 optimizer state and non-finite losses.

This CPU has no native bf16 (it is emulated, ~4x slower), so half-precision paths are checked for
correctness on the tiny model only: close to fp32, checkpoints in fp32, state that survives a resume.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from clipforge.models.checkpoint_files import load_extra, load_model_state, load_optimizer_state
from clipforge.train import precision
from clipforge.train.loop import train_worker
from clipforge.train.spec import PrecisionSpec
from clipforge.train.trainer import run_train

from dist_utils import run_distributed
from train_fixtures import read_lines, step_lines, train_spec, write_shards


def _spec(root: Path, name: str, shard: Path, **over):
    raw = {
        "optim": {"epochs": 1, "lr": 2e-3, "warmup_steps": 1, "grad_clip_norm": 1.0},
        "data": {"augment": {"crop_scale": [1.0, 1.0]}},
        "checkpoint": {"every_epochs": 1, "keep_last": 2},
        "scaling": {"workers": 1},
    }
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return train_spec(str(root / name), [str(shard)], **raw)


def _lines(run: Path) -> list[dict]:
    return step_lines(read_lines((run / "metrics.jsonl").read_text()))


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    (path,) = write_shards(tmp_path_factory.mktemp("precision") / "data", [24])
    return path


def test_precision_settings():
    cpu = torch.device("cpu")
    x = torch.randn(4, 4)
    for mode, dtype in (("fp32", torch.float32), ("amp_bf16", torch.bfloat16), ("pure_bf16", torch.float32)):
        with precision.autocast(PrecisionSpec(mode=mode), cpu):
            assert (x @ x).dtype == dtype, mode
    assert precision.cast_inputs((x, torch.ones(2, dtype=torch.long)), PrecisionSpec(mode="pure_bf16"))[0].dtype \
        == torch.bfloat16
    assert precision.cast_inputs((x,), PrecisionSpec(mode="amp_bf16"))[0] is x
    assert precision.grad_scaler(PrecisionSpec(mode="amp_fp16", init_scale=8.0), cpu).get_scale() == 8.0
    assert precision.grad_scaler(PrecisionSpec(mode="amp_bf16"), cpu) is None
    policy = precision.mixed_precision_policy(PrecisionSpec(mode="amp_fp16", reduce_dtype="bf16"))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.float16, torch.bfloat16)
    assert precision.mixed_precision_policy(PrecisionSpec()).param_dtype is None
    assert precision.deepspeed_section(PrecisionSpec(mode="pure_bf16")) == {"bf16": {"enabled": True}}
    assert precision.deepspeed_section(PrecisionSpec(mode="amp_fp16"))["torch_autocast"]["dtype"] == "float16"


@pytest.mark.parametrize("mode", ["amp_bf16", "pure_bf16", "amp_fp16"])
def test_half_precision_trains_close_to_fp32_and_saves_fp32(tmp_path, shard, mode):
    torch.set_num_threads(1)
    train_worker(_spec(tmp_path, "fp32", shard))
    train_worker(_spec(tmp_path, mode, shard, precision=mode))
    fp32, half = _lines(tmp_path / "fp32"), _lines(tmp_path / mode)
    # Same initial model and batch: the first loss differs only by rounding.
    assert half[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=2e-2)
    assert all(math.isfinite(m["loss"]) for m in half)
    assert half[0]["loss"] != fp32[0]["loss"]  # the forward really ran in half precision
    weights = load_model_state(str(tmp_path / mode / "checkpoints" / "epoch_0001"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_fp16_gradient_scaler_state_is_checkpointed_and_resumed(tmp_path, shard):
    torch.set_num_threads(1)
    over = {"precision": {"mode": "amp_fp16", "init_scale": 2.0 ** 24}}
    whole = _spec(tmp_path, "whole", shard, optim={"epochs": 2}, **over)
    train_worker(whole)
    lines = _lines(tmp_path / "whole")
    # 2^24 overflows fp16 gradients: the scaler skips those steps and halves its scale each time.
    assert lines[0]["grad_norm"] is None and lines[0]["loss_scale"] == 2.0 ** 23
    saved = load_extra(str(tmp_path / "whole" / "checkpoints" / "epoch_0001"))["grad_scaler"]
    assert saved["scale"] == lines[2]["loss_scale"] < 2.0 ** 24

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "epoch_0001", resumed / "checkpoints" / "epoch_0001")
    train_worker(whole.model_copy(update={"storage": str(resumed)}))
    again = _lines(resumed)
    # A scaler restarted at 2^24 would skip steps again; the restored one continues where it stood.
    assert [m["loss_scale"] for m in again] == [m["loss_scale"] for m in lines[3:]]
    assert [m["loss"] for m in again] == pytest.approx([m["loss"] for m in lines[3:]], abs=1e-6)


def test_bf16_optimizer_state_is_saved_and_resumed(tmp_path, shard):
    torch.set_num_threads(1)
    whole = _spec(tmp_path, "whole", shard, optim={"epochs": 2, "state_dtype": "bf16"})
    train_worker(whole)
    lines = _lines(tmp_path / "whole")
    state = load_optimizer_state(str(tmp_path / "whole" / "checkpoints" / "epoch_0001"))["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.bfloat16}
    assert {s["exp_avg_sq"].dtype for s in state.values()} == {torch.bfloat16}
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "epoch_0001", resumed / "checkpoints" / "epoch_0001")
    train_worker(whole.model_copy(update={"storage": str(resumed)}))
    again = [m["loss"] for m in _lines(resumed)]
    assert again[0] == pytest.approx(lines[3]["loss"], abs=1e-6)  # same weights before the first resumed update
    # Later steps differ only by the stochastic rounding's draws.
    assert again == pytest.approx([m["loss"] for m in lines[3:]], abs=2e-2)


def _nonfinite_rank(rank: int, world_size: int, storage: str, shard: str) -> dict:
    """Steps on a DDP-wrapped tiny model; rank 1's batch of step 2 and 3 is NaN."""
    from clipforge.models import ModelSpec, create_model
    from clipforge.train.loop import Progress, TrainingDiverged, _optimisation, _step

    spec = train_spec(storage, [shard], optim={"on_nonfinite": "skip", "max_skipped_steps": 1, "lr": 1e-2},
                      scaling={"workers": 2, "cpus_per_worker": 1})
    model = create_model(ModelSpec(name="tiny")).model.train()
    bundle_tokens = torch.randint(1, 400, (4, 32), generator=torch.Generator().manual_seed(rank))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 + rank))
    progress = Progress()
    opt = _optimisation(spec, model, torch.device("cpu"), 10, progress, {})
    _step(opt, (images, bundle_tokens), spec, progress, 0)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    bad = images.clone()
    if rank == 1:
        bad[0, 0, 0, 0] = float("nan")
    _step(opt, (bad, bundle_tokens), spec, progress, 0)
    unchanged = all(torch.equal(v, after_first[k]) for k, v in model.state_dict().items())
    metrics, lr_index = dict(opt.step_metrics), opt.schedule.step_index
    try:
        _step(opt, (bad, bundle_tokens), spec, progress, 0)
        error = ""
    except TrainingDiverged as e:
        error = str(e)
    return {"unchanged": unchanged, "metrics": metrics, "lr_index": lr_index, "error": error,
            "steps": progress.step, "logit_scale": model.state_dict()["logit_scale"].clone()}


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, shard):
    results = run_distributed(_nonfinite_rank, 2, (str(tmp_path / "run"), str(shard)))
    for r in results:
        # The NaN on rank 1 reaches rank 0 through the loss mean: both drop the update.
        assert r["unchanged"]
        assert r["metrics"] == {"grad_norm": None, "skipped_steps": 1}
        assert r["lr_index"] == 2  # the schedule moves on: the batch was used
        # A second NaN step in a row exceeds max_skipped_steps: 1.
        assert "loss is nan at step 3 (epoch 1) (2 steps in a row)" in r["error"]
    assert torch.equal(results[0]["logit_scale"], results[1]["logit_scale"])


@pytest.mark.timeout(600)
def test_fsdp2_amp_bf16_two_workers_close_to_fp32(tmp_path, shard, ray_local):
    torch.set_num_threads(1)
    train_worker(_spec(tmp_path, "fp32", shard, optim={"epochs": 2}))
    spec = _spec(tmp_path, "fsdp2-bf16", shard, strategy="fsdp2", precision="amp_bf16", optim={"epochs": 2},
                 scaling={"workers": 2, "cpus_per_worker": 1})
    run_train(spec)
    fp32, half = _lines(tmp_path / "fp32"), _lines(tmp_path / "fsdp2-bf16")
    assert [m["loss"] for m in half] == pytest.approx([m["loss"] for m in fp32], abs=3e-2)
    assert half[3]["loss"] < half[0]["loss"] - 0.05
    weights = load_model_state(str(tmp_path / "fsdp2-bf16" / "checkpoints" / "epoch_0002"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
