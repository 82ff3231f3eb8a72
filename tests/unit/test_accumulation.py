"""accumulated_step: k micro-batches give the parameter gradients of one big batch (one process and DDP ranks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clipforge.models.accumulation import accumulated_step
from clipforge.models.losses import ClipLoss
from clipforge.models.losses_siglip import SigLipLoss
from clipforge.models.losses_tiled import TiledClipLoss

from dist_utils import run_distributed, two_heads_and_inputs

torch.set_num_threads(1)


def tiny_model(logit_bias: float | None = None):
    from clipforge.models import ModelSpec, create_model

    bundle = create_model(ModelSpec(name="tiny", init_logit_bias=logit_bias))
    return bundle.model.train(), bundle.tokenizer


def inputs(tokenizer, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    words = ["red", "cat", "blue", "sky", "old", "boat", "tree", "dog", "sun", "rain", "car", "hat"]
    tokens = tokenizer([f"a {words[i % 12]} {words[(3 * i + 1) % 12]} number {i}" for i in range(n)])
    return images, tokens


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_equal(ours: dict, ref: dict, rtol: float = 1e-5):
    assert set(ours) == set(ref)
    for name, g in ref.items():
        atol = rtol * max(g.abs().max().item(), 1e-12)
        torch.testing.assert_close(ours[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def split(batch: tuple[torch.Tensor, ...], sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
    return list(zip(*(t.split(sizes) for t in batch)))


@pytest.mark.parametrize("loss_name,sizes", [("clip", [4, 4, 4]), ("clip", [5, 4, 3]), ("tiled", [4, 4, 4]),
                                             ("siglip", [4, 4, 4])])
def test_accumulated_step_equals_one_big_batch(loss_name, sizes):
    loss_fn = {"clip": ClipLoss(), "tiled": TiledClipLoss(tile_size=5), "siglip": SigLipLoss()}[loss_name]
    model, tokenizer = tiny_model(logit_bias=-10.0 if loss_name == "siglip" else None)
    batch = inputs(tokenizer, sum(sizes))

    model.zero_grad()
    big_loss = loss_fn(*model(*batch))
    big_loss.backward()
    ref = grads(model)

    model.zero_grad()
    loss = accumulated_step(model, split(batch, sizes), loss_fn)
    ours = grads(model)
    torch.testing.assert_close(loss, big_loss.detach(), rtol=1e-6, atol=0)
    assert_grads_equal(ours, ref)
    # Not the naive sum of per-micro-batch losses: those see fewer negatives.
    model.zero_grad()
    for micro in split(batch, sizes):
        loss_fn(*model(*micro)).backward()
    naive = grads(model)
    assert not torch.allclose(naive["visual.proj"], ref["visual.proj"], rtol=1e-3)
    if loss_name != "siglip":
        # The temperature's gradient is counted once, not once per micro-batch.
        assert not torch.allclose(naive["logit_scale"], ref["logit_scale"], rtol=1e-3)


def test_single_micro_batch_is_a_plain_step_and_bad_outputs_are_errors():
    model, tokenizer = tiny_model()
    batch = inputs(tokenizer, 6)
    model.zero_grad()
    ClipLoss()(*model(*batch)).backward()
    ref = grads(model)
    model.zero_grad()
    accumulated_step(model, [batch], ClipLoss())
    assert_grads_equal(grads(model), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        accumulated_step(model, [], ClipLoss())
    with pytest.raises(ValueError, match="logit_scale"):
        accumulated_step(lambda x, t: model.encode_image(x), [batch], ClipLoss())


MICRO, STEPS_PER_RANK = [3, 2, 3], 2


def _ddp_worker(rank: int, world: int) -> dict:
    per_rank = sum(MICRO)
    model, x_img, x_txt = two_heads_and_inputs(per_rank * world)
    ddp = nn.parallel.DistributedDataParallel(model)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    out = {}
    for step in range(STEPS_PER_RANK):
        # The same batch twice: the second step checks that DDP's reducer is ready again after a no_sync run.
        ddp.zero_grad()
        accumulated_step(ddp, split((x_img[rows], x_txt[rows]), MICRO), ClipLoss())
        out[step] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out


def test_ddp_accumulation_equals_single_process_global_batch():
    ranks = run_distributed(_ddp_worker, world_size=2)
    model, x_img, x_txt = two_heads_and_inputs(2 * sum(MICRO))
    ClipLoss()(*model(x_img, x_txt)).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    for res in ranks:
        for step in range(STEPS_PER_RANK):
            assert_grads_equal(res[step], ref)
