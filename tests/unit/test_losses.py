"""ClipLoss against a naive full-batch reference and open_clip's ClipLoss, in one process and across 2 gloo ranks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.losses import ClipLoss, clamp_logit_scale, create_loss
from clipforge.models.spec import LossSpec

from dist_utils import open_clip_loss, run_distributed, two_heads_and_inputs

torch.set_num_threads(1)
DIM = 16
CASES = [(True, True), (False, True), (True, False), (False, False)]


def reference_row_losses(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric cross entropy of the full B x B similarity matrix, written out by hand."""
    logits = scale * img @ txt.T
    image_to_text = -(logits.diagonal() - torch.logsumexp(logits, dim=1))
    text_to_image = -(logits.diagonal() - torch.logsumexp(logits, dim=0))
    return (image_to_text + text_to_image) / 2


def reference_loss(img, txt, scale):
    return reference_row_losses(img, txt, scale).mean()


def global_batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.1 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(1 / 0.07, dtype=torch.float64)


def loss_and_grads(loss_fn, img, txt, scale):
    img, txt, scale = (t.detach().clone().requires_grad_(True) for t in (img, txt, scale))
    loss = loss_fn(img, txt, scale)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}


def assert_close_dicts(a, b, keys=("loss", "img", "txt", "scale")):
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("local_loss,gather_with_grad", CASES)
def test_single_process_matches_reference_and_open_clip(local_loss, gather_with_grad):
    img, txt, scale = global_batch(12)
    ours = loss_and_grads(ClipLoss(local_loss, gather_with_grad), img, txt, scale)
    ref = loss_and_grads(reference_loss, img, txt, scale)
    oc = loss_and_grads(open_clip_loss().ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad),
                        img, txt, scale)
    assert_close_dicts(ours, ref)
    assert_close_dicts(ours, oc)
    # Matched pairs are more similar than random pairs here, so the loss is below chance level.
    assert 0 < ours["loss"].item() < math.log(12)


def test_loss_reaches_zero_for_perfect_alignment_only():
    eye = torch.eye(6, dtype=torch.float64)
    assert ClipLoss()(eye, eye, torch.tensor(100.0, dtype=torch.float64)).item() < 1e-6
    shuffled = eye[torch.tensor([1, 2, 3, 4, 5, 0])]
    assert ClipLoss()(eye, shuffled, torch.tensor(100.0, dtype=torch.float64)).item() > 10


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        ClipLoss()(torch.zeros(4, 8), torch.zeros(3, 8), torch.tensor(1.0))


def test_create_loss_and_clamp():
    loss = create_loss(LossSpec(local_loss=False, gather_with_grad=True))
    assert isinstance(loss, ClipLoss) and not loss.local_loss and loss.gather_with_grad
    model = nn.Module()
    model.logit_scale = nn.Parameter(torch.tensor(9.0))
    clamp_logit_scale(model, max_scale=50.0)
    assert model.logit_scale.item() == pytest.approx(math.log(50.0))
    model.logit_scale.data.fill_(-3.0)
    wrapper = nn.Module()
    wrapper.module = model  # the DDP layout: the model under `.module`
    clamp_logit_scale(wrapper)
    assert model.logit_scale.item() == 0.0
    assert model.logit_scale.requires_grad


def _rows(rank: int, sizes: list[int]) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _rank_worker(rank: int, world: int, equal_sizes: list[int], unequal_sizes: list[int]) -> dict:
    """Everything the distributed tests need from one rank, computed in a single spawn."""
    out: dict = {}
    img, txt, scale = global_batch(sum(equal_sizes))
    rows = _rows(rank, equal_sizes)
    for local_loss, gather_with_grad in CASES:
        key = f"{int(local_loss)}{int(gather_with_grad)}"
        out[f"ours{key}"] = loss_and_grads(ClipLoss(local_loss, gather_with_grad), img[rows], txt[rows], scale)
        oc_loss = open_clip_loss().ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad,
                                          rank=rank, world_size=world)
        out[f"open_clip{key}"] = loss_and_grads(oc_loss, img[rows], txt[rows], scale)

    img, txt, scale = global_batch(sum(unequal_sizes), seed=3)
    rows = _rows(rank, unequal_sizes)
    out["unequal"] = loss_and_grads(ClipLoss(True, True), img[rows], txt[rows], scale)

    for local_loss in (True, False):
        model, x_img, x_txt = two_heads_and_inputs(sum(equal_sizes), torch.float64)
        ddp = nn.parallel.DistributedDataParallel(model)
        rows = _rows(rank, equal_sizes)
        ClipLoss(local_loss=local_loss)(*ddp(x_img[rows], x_txt[rows])).backward()
        out[f"ddp{int(local_loss)}"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out


EQUAL, UNEQUAL = [4, 4], [5, 3]


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_rank_worker, world_size=2, args=(EQUAL, UNEQUAL))


def test_distributed_local_loss_is_each_ranks_share_of_the_global_loss(ranks):
    img, txt, scale = global_batch(sum(EQUAL))
    ref = loss_and_grads(reference_loss, img, txt, scale)
    per_row = reference_row_losses(img, txt, scale)
    world = len(ranks)
    for rank, res in enumerate(ranks):
        ours = res["ours11"]
        torch.testing.assert_close(ours["loss"], per_row[_rows(rank, EQUAL)].mean())
        # The all-gather's backward sums every rank's loss gradient into the local rows: W x the
        # reference gradient, which DDP's averaging over W ranks turns back into the reference.
        torch.testing.assert_close(ours["img"], world * ref["img"][_rows(rank, EQUAL)])
        torch.testing.assert_close(ours["txt"], world * ref["txt"][_rows(rank, EQUAL)])
    torch.testing.assert_close(sum(r["ours11"]["loss"] for r in ranks) / world, ref["loss"])
    torch.testing.assert_close(sum(r["ours11"]["scale"] for r in ranks), world * ref["scale"])


def test_distributed_global_loss_on_every_rank(ranks):
    img, txt, scale = global_batch(sum(EQUAL))
    ref = loss_and_grads(reference_loss, img, txt, scale)
    world = len(ranks)
    for rank, res in enumerate(ranks):
        ours = res["ours01"]
        torch.testing.assert_close(ours["loss"], ref["loss"])
        torch.testing.assert_close(ours["scale"], ref["scale"])
        torch.testing.assert_close(ours["img"], world * ref["img"][_rows(rank, EQUAL)])
        torch.testing.assert_close(ours["txt"], world * ref["txt"][_rows(rank, EQUAL)])


@pytest.mark.parametrize("local_loss,gather_with_grad", CASES)
def test_distributed_matches_open_clip(ranks, local_loss, gather_with_grad):
    key = f"{int(local_loss)}{int(gather_with_grad)}"
    for res in ranks:
        assert_close_dicts(res[f"ours{key}"], res[f"open_clip{key}"])


def test_distributed_unequal_rank_batches(ranks):
    """Sum of the ranks' local losses, differentiated on the whole batch, gives every rank's gradient."""
    img, txt, scale = global_batch(sum(UNEQUAL), seed=3)

    def sum_of_rank_losses(i, t, s):
        rows = reference_row_losses(i, t, s)
        return sum(rows[_rows(r, UNEQUAL)].mean() for r in range(len(UNEQUAL)))

    ref = loss_and_grads(sum_of_rank_losses, img, txt, scale)
    per_row = reference_row_losses(img, txt, scale)
    for rank, res in enumerate(ranks):
        torch.testing.assert_close(res["unequal"]["loss"], per_row[_rows(rank, UNEQUAL)].mean())
        torch.testing.assert_close(res["unequal"]["img"], ref["img"][_rows(rank, UNEQUAL)])
        torch.testing.assert_close(res["unequal"]["txt"], ref["txt"][_rows(rank, UNEQUAL)])
    torch.testing.assert_close(sum(r["unequal"]["scale"] for r in ranks), ref["scale"])


@pytest.mark.parametrize("local_loss", [True, False])
def test_ddp_update_equals_single_process_gradient(ranks, local_loss):
    """DDP-averaged parameter gradients == gradients of the single-process loss on the global batch."""
    model, x_img, x_txt = two_heads_and_inputs(sum(EQUAL), torch.float64)
    ClipLoss()(*model(x_img, x_txt)).backward()
    for res in ranks:
        for name, p in model.named_parameters():
            torch.testing.assert_close(res[f"ddp{int(local_loss)}"][name], p.grad, msg=lambda m: f"{name}: {m}")
