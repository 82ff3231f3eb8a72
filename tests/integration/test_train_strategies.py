"""Parallelism strategies on 2 real Ray Train CPU workers: ddp, fsdp2, deepspeed (ZeRO-2 and ZeRO-3).

Every run trains the tiny model on one shard of 24 pictures without shuffling or random crops, so
step s of a 2-worker run (rank 0: samples 0, 2, 4, ...; rank 1: 1, 3, 5, ...) sees the same global batch
as step s of one process with the whole batch. Matching that process's losses shows that the loss's
all-gather and each strategy's gradient reduction are right; clipping is on in both, and the fsdp2 run
accumulates two micro-batches per step.

Checkpoints have one format under every strategy (full fp32 weights, torch.optim's numbered optimizer
state), so a checkpoint written by one strategy resumes under another.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clipforge.models import ModelSpec, create_model
from clipforge.models.checkpoint_files import load_meta, load_model_state, load_optimizer_state
from clipforge.train.deepspeed_config import DeepSpeedConfigError, deepspeed_config
from clipforge.train.loop import train_worker
from clipforge.train.spec import TrainSpec
from clipforge.train.trainer import run_train

from dist_utils import run_distributed
from train_fixtures import read_lines, step_lines, train_spec, write_shards

STEPS_PER_EPOCH = 3  # 24 samples, global batch 8


def _common(**over) -> dict:
    raw = {
        "optim": {"epochs": 2, "lr": 2e-3, "warmup_steps": 1, "grad_clip_norm": 1.0},
        "data": {"augment": {"crop_scale": [1.0, 1.0]}},
        "checkpoint": {"every_epochs": 1, "keep_last": 2},
    }
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return raw


def _spec(root: Path, name: str, shard: Path, **over) -> TrainSpec:
    return train_spec(str(root / name), [str(shard)], **_common(**over))


def _losses(run: Path) -> list[float]:
    return [m["loss"] for m in step_lines(read_lines((run / "metrics.jsonl").read_text()))]


def _resume_copy(run: Path, checkpoint: str, into: Path) -> None:
    """A run directory holding only `checkpoint` of `run`, as a run cut off right after writing it."""
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / checkpoint, into / "checkpoints" / checkpoint)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("strategies")
    write_shards(root / "data", [24])
    return root


@pytest.fixture(scope="module")
def reference(data) -> list[float]:
    """Losses of one process with the whole global batch (no wrapper, no gather)."""
    torch.set_num_threads(1)
    spec = _spec(data, "reference", data / "data" / "part-00000.tar", scaling={"workers": 1})
    train_worker(spec)
    return _losses(data / "reference")


def _check_checkpoint_format(checkpoint: Path) -> None:
    """Full, unsharded fp32 weights with the model's own shapes; optimizer state numbered like torch.optim's."""
    fresh = create_model(ModelSpec(name="tiny")).model
    expected = fresh.state_dict()
    saved = load_model_state(str(checkpoint))
    assert set(saved) == set(expected)
    for key, value in saved.items():
        assert (value.shape, value.dtype) == (expected[key].shape, expected[key].dtype), key
    optim = load_optimizer_state(str(checkpoint))
    assert sorted(optim["state"]) == list(range(len(list(fresh.parameters()))))
    assert [len(g["params"]) for g in optim["param_groups"]] == [
        sum(p.ndim >= 2 for p in fresh.parameters()), sum(p.ndim < 2 for p in fresh.parameters())]
    shapes = {tuple(s["exp_avg"].shape) for s in optim["state"].values()}
    assert () in shapes  # the temperature's moments keep its 0-dim shape
    assert {int(s["step"]) for s in optim["state"].values()} == {load_meta(str(checkpoint))["step"]}


@pytest.fixture(scope="module")
def ddp_run(data, ray_local) -> tuple[TrainSpec, list[float]]:
    torch.set_num_threads(1)
    spec = _spec(data, "ddp", data / "data" / "part-00000.tar")
    run_train(spec)
    return spec, _losses(data / "ddp")


@pytest.mark.timeout(600)
def test_ddp_matches_one_process(data, reference, ddp_run):
    _, losses = ddp_run
    assert len(losses) == 2 * STEPS_PER_EPOCH
    assert losses == pytest.approx(reference, abs=2e-4)
    # Step 4 sees step 1's batch again, after three updates.
    assert losses[3] < losses[0] - 0.05
    _check_checkpoint_format(data / "ddp" / "checkpoints" / "epoch_0002")


@pytest.mark.timeout(600)
def test_ddp_resume_continues_like_the_uninterrupted_run(data, ddp_run):
    spec, losses = ddp_run
    # Cut off after epoch 1: the resumed run's next steps are those of the uninterrupted run.
    resumed = data / "ddp-resumed"
    _resume_copy(data / "ddp", "epoch_0001", resumed)
    run_train(spec.model_copy(update={"storage": str(resumed)}))
    assert _losses(resumed) == pytest.approx(losses[STEPS_PER_EPOCH:], abs=1e-6)


@pytest.fixture(scope="module")
def fsdp2_run(data, ray_local) -> tuple[TrainSpec, list[float]]:
    torch.set_num_threads(1)
    # Two micro-batches per step: the accumulated step must equal the whole batch's, sharded too.
    spec = _spec(data, "fsdp2", data / "data" / "part-00000.tar", strategy="fsdp2",
                 optim={"accumulation_steps": 2})
    run_train(spec)
    return spec, _losses(data / "fsdp2")


@pytest.mark.timeout(600)
def test_fsdp2_matches_one_process(data, reference, fsdp2_run):
    _, losses = fsdp2_run
    assert losses == pytest.approx(reference, abs=2e-4)
    assert losses[3] < losses[0] - 0.05
    lines = step_lines(read_lines((data / "fsdp2" / "metrics.jsonl").read_text()))
    assert all(m["grad_norm"] > 0 for m in lines) and lines[0]["grad_norm"] > 1.0  # clipped to 1.0 afterwards
    _check_checkpoint_format(data / "fsdp2" / "checkpoints" / "epoch_0002")


@pytest.mark.timeout(600)
def test_fsdp2_resume_continues_like_the_uninterrupted_run(data, fsdp2_run):
    spec, losses = fsdp2_run
    resumed = data / "fsdp2-resumed"
    _resume_copy(data / "fsdp2", "epoch_0001", resumed)
    run_train(spec.model_copy(update={"storage": str(resumed)}))
    assert _losses(resumed) == pytest.approx(losses[STEPS_PER_EPOCH:], abs=1e-6)


@pytest.mark.timeout(600)
def test_deepspeed_zero3_matches_one_process_and_its_checkpoint_resumes_anywhere(data, reference, ray_local):
    torch.set_num_threads(1)
    shard = data / "data" / "part-00000.tar"
    spec = _spec(data, "zero3", shard, strategy="deepspeed", parallel={"zero_stage": 3})
    run_train(spec)
    losses = _losses(data / "zero3")
    assert losses == pytest.approx(reference, abs=2e-4)
    assert losses[3] < losses[0] - 0.05
    _check_checkpoint_format(data / "zero3" / "checkpoints" / "epoch_0002")
    # ZeRO-3's checkpoint after epoch 1 (weights and AdamW moments gathered from the partitions) resumes
    # in one plain process with the same global batch, which continues as ZeRO-3 did.
    resumed = data / "zero3-resumed"
    _resume_copy(data / "zero3", "epoch_0001", resumed)
    train_worker(_spec(data, "zero3-resumed", shard, scaling={"workers": 1}))
    assert _losses(resumed) == pytest.approx(losses[STEPS_PER_EPOCH:], abs=2e-4)


@pytest.mark.timeout(600)
def test_deepspeed_zero2_resumes_a_ddp_checkpoint(data, ddp_run):
    """ZeRO-2 loads the full AdamW moments of a DDP checkpoint into its partitions and continues like DDP."""
    spec, losses = ddp_run
    resumed = data / "zero2-resumed"
    _resume_copy(data / "ddp", "epoch_0001", resumed)
    run_train(spec.model_copy(update={"storage": str(resumed), "strategy": "deepspeed"}))
    assert _losses(resumed) == pytest.approx(losses[STEPS_PER_EPOCH:], abs=2e-4)
    _check_checkpoint_format(resumed / "checkpoints" / "epoch_0002")


def test_deepspeed_config_fills_what_the_given_config_leaves_out(tmp_path):
    spec = train_spec(str(tmp_path / "run"), ["x.tar"], strategy="deepspeed", precision="pure_bf16",
                      optim={"grad_clip_norm": 2.0},
                      parallel={"zero_stage": 3, "offload_optimizer": True,
                                "deepspeed_config": {"zero_optimization": {"overlap_comm": True},
                                                     "gradient_clipping": 5.0}})
    config = deepspeed_config(spec)
    assert config["zero_optimization"] == {"overlap_comm": True, "stage": 3,
                                           "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert config["gradient_clipping"] == 5.0  # the given config wins
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (8, 4)
    assert config["bf16"] == {"enabled": True}
    for given, message in (({"optimizer": {"type": "Adam"}}, "deepspeed_config.optimizer: the optimizer"),
                           ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu is 2, .* make it 4"),
                           ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps must be 1")):
        bad = spec.model_copy(update={"parallel": spec.parallel.model_copy(update={"deepspeed_config": given})})
        with pytest.raises(DeepSpeedConfigError, match=message):
            deepspeed_config(bad)


@pytest.mark.parametrize("over, message", [
    ({"strategy": "deepspeed", "optim": {"accumulation_steps": 2}},
     "accumulation_steps > 1 needs strategy ddp or fsdp2"),
    ({"strategy": "deepspeed", "model": {"name": "tiny", "trainable": [{"until_step": 2, "trainable": "all"},
                                                                        {"trainable": "heads"}]}},
     "list of stages needs strategy ddp or fsdp2"),
    ({"strategy": "fsdp2", "optim": {"state_dtype": "bf16"}}, "state_dtype bf16 is not supported with strategy fsdp2"),
    ({"strategy": "fsdp2", "model": {"name": "tiny", "trainable": "heads"}}, "heads-only training on cached features"),
    ({"optim": {"accumulation_steps": 3}}, r"worker's batch \(4 = .*\) must be divisible by optim.accumulation_steps"),
    ({"strategy": "deepspeed", "precision": "amp_fp16"}, "amp_fp16 is not supported with strategy deepspeed"),
    ({"precision": "fp8"}, "precision.mode"),
])
def test_spec_rejects_combinations_a_strategy_cannot_train(tmp_path, over, message):
    with pytest.raises(ValueError, match=message):
        train_spec(str(tmp_path / "run"), ["x.tar"], **over)


def _embed_rank(rank: int, world_size: int, strategy: str, zero_stage: int) -> dict:
    """Embeddings of a sharded tiny model inside `full_parameters`, as evaluations during training take them."""
    import os

    from clipforge.train.strategy import build_strategy

    os.environ["LOCAL_RANK"] = str(rank)
    spec = train_spec("unused", ["x.tar"], strategy=strategy, parallel={"zero_stage": zero_stage})
    model = create_model(ModelSpec(name="tiny")).model
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    parallel = build_strategy(model, spec, torch.device("cpu")).wrapped
    with torch.no_grad(), parallel.full_parameters():
        embedded = model.encode_image(images)
    sharded = {n: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.data.shape)
               for n, p in model.named_parameters()}
    return {"embedded": embedded, "conv1": sharded["visual.conv1.weight"]}


@pytest.mark.parametrize("strategy, zero_stage", [("fsdp2", 2), ("deepspeed", 3)])
def test_sharded_models_embed_whole_inside_full_parameters(strategy, zero_stage):
    expected = create_model(ModelSpec(name="tiny")).model.encode_image(
        torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))).detach()
    results = run_distributed(_embed_rank, 2, (strategy, zero_stage))
    for r in results:
        assert torch.allclose(r["embedded"], expected, atol=1e-5)
        # Outside the context the parameters are sharded again (a part of the 64 conv filters per rank).
        assert r["conv1"] != (64, 3, 8, 8)
