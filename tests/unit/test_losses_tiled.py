"""TiledClipLoss: ClipLoss's loss and gradients without the B x B logits, in one process and across 2 gloo ranks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.models.losses import ClipLoss, create_loss
from clipforge.models.losses_tiled import TiledClipLoss, tiled_cross_entropy
from clipforge.models.spec import LossSpec

from dist_utils import run_distributed

torch.set_num_threads(1)
DIM = 16
CASES = [(True, True), (False, True), (True, False), (False, False)]


def features(n: int, dtype=torch.float64, seed: int = 0, scale: float = 1 / 0.07):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype), torch.tensor(scale, dtype=dtype)


def naive_loss(img, txt, scale):
    """Mean over pairs of the two cross entropies of the full similarity matrix, written out by hand."""
    logits = scale * img @ txt.T
    rows = torch.logsumexp(logits, dim=1) - logits.diagonal()
    cols = torch.logsumexp(logits, dim=0) - logits.diagonal()
    return (rows.mean() + cols.mean()) / 2


def loss_and_grads(loss_fn, img, txt, scale):
    img, txt, scale = (t.detach().clone().requires_grad_(True) for t in (img, txt, scale))
    loss = loss_fn(img, txt, scale)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}


def assert_same(ours: dict, ref: dict, rtol: float, keys=("loss", "img", "txt", "scale")):
    for k in keys:
        # Relative to the largest entry: a gradient's tiny entries carry absolute, not relative, rounding.
        atol = rtol * ref[k].abs().max().item()
        torch.testing.assert_close(ours[k], ref[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("n,tile", [(12, 5), (12, 12), (12, 100), (37, 8), (30, 1)])
def test_single_process_equals_clip_loss_and_naive_reference(n, tile):
    img, txt, scale = features(n)
    ours = loss_and_grads(TiledClipLoss(tile_size=tile), img, txt, scale)
    assert_same(ours, loss_and_grads(ClipLoss(), img, txt, scale), rtol=1e-12)
    assert_same(ours, loss_and_grads(naive_loss, img, txt, scale), rtol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_fp32_within_1e5_of_clip_loss(scale):
    img, txt, s = features(300, torch.float32, seed=1, scale=scale)
    ours = loss_and_grads(TiledClipLoss(tile_size=64), img, txt, s)
    assert_same(ours, loss_and_grads(ClipLoss(), img, txt, s), rtol=1e-5)


def test_online_log_sum_exp_survives_logits_far_beyond_exp_range():
    # exp(1000) overflows any float: a tile-wise log-sum-exp must rescale as new maxima appear.
    img, txt, _ = features(40, seed=2)
    scale = torch.tensor(1000.0, dtype=torch.float64)
    ours = loss_and_grads(TiledClipLoss(tile_size=7), img, txt, scale)
    assert all(torch.isfinite(v).all() for v in ours.values())
    assert_same(ours, loss_and_grads(naive_loss, img, txt, scale), rtol=1e-10)


def test_gradcheck_rows_and_square_modes():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    sq = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: tiled_cross_entropy(a, b, s, offset=2, tile=4), (a, b, s))
    assert torch.autograd.gradcheck(
        lambda a, b, s: tiled_cross_entropy(a, b, s, tile=4, w_row=0.3, w_col=0.7), (sq, b, s))


def test_memory_saved_for_backward_is_linear_in_the_batch():
    """ClipLoss keeps B x B tensors for its backward pass; the tiled loss keeps only the features and 2B statistics."""
    def saved_bytes(loss_fn, n):
        img, txt, scale = (t.requires_grad_(True) for t in features(n, torch.float32))
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(img, txt, scale)
        return total

    n = 512
    features_bytes = 2 * n * DIM * 4
    tiled = saved_bytes(TiledClipLoss(tile_size=64), n)
    assert tiled <= features_bytes + 2 * n * 4 + 64, tiled
    assert saved_bytes(ClipLoss(), n) >= n * n * 4
    assert saved_bytes(TiledClipLoss(tile_size=64), 2 * n) <= 2 * tiled + 64


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        TiledClipLoss()(torch.zeros(4, 8), torch.zeros(3, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="tile_size"):
        TiledClipLoss(tile_size=0)
    with pytest.raises(ValueError, match="outside"):
        tiled_cross_entropy(torch.zeros(4, 8), torch.zeros(5, 8), torch.tensor(1.0), offset=2)
    with pytest.raises(ValueError, match="square"):
        tiled_cross_entropy(torch.zeros(4, 8), torch.zeros(5, 8), torch.tensor(1.0), w_col=0.5)


def test_create_loss_builds_the_tiled_loss_from_the_spec():
    loss = create_loss(LossSpec(kind="clip_tiled", tile_size=256, local_loss=False))
    assert isinstance(loss, TiledClipLoss) and loss.tile_size == 256 and not loss.local_loss
    assert LossSpec().kind == "clip" and isinstance(create_loss(LossSpec()), ClipLoss)
    with pytest.raises(ValueError, match="tile_size"):
        LossSpec(kind="clip_tiled", tile_size=0)


def _rows(rank: int, sizes: list[int]) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _rank_worker(rank: int, world: int, equal: list[int], unequal: list[int]) -> dict:
    out = {}
    for dtype in (torch.float64, torch.float32):
        img, txt, scale = features(sum(equal), dtype)
        rows = _rows(rank, equal)
        for local_loss, with_grad in CASES:
            key = f"{dtype}{int(local_loss)}{int(with_grad)}"
            out["tiled" + key] = loss_and_grads(TiledClipLoss(local_loss, with_grad, tile_size=3),
                                                img[rows], txt[rows], scale)
            out["clip" + key] = loss_and_grads(ClipLoss(local_loss, with_grad), img[rows], txt[rows], scale)
    img, txt, scale = features(sum(unequal), seed=5)
    rows = _rows(rank, unequal)
    out["unequal_tiled"] = loss_and_grads(TiledClipLoss(tile_size=2), img[rows], txt[rows], scale)
    out["unequal_clip"] = loss_and_grads(ClipLoss(), img[rows], txt[rows], scale)
    return out


EQUAL, UNEQUAL = [5, 5], [6, 3]


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_rank_worker, world_size=2, args=(EQUAL, UNEQUAL))


@pytest.mark.parametrize("local_loss,gather_with_grad", CASES)
def test_distributed_equals_clip_loss_on_every_rank(ranks, local_loss, gather_with_grad):
    for res in ranks:
        key = f"{int(local_loss)}{int(gather_with_grad)}"
        assert_same(res[f"tiled{torch.float64}{key}"], res[f"clip{torch.float64}{key}"], rtol=1e-12)
        assert_same(res[f"tiled{torch.float32}{key}"], res[f"clip{torch.float32}{key}"], rtol=1e-5)


def test_distributed_local_losses_average_to_the_naive_global_loss(ranks):
    img, txt, scale = features(sum(EQUAL))
    ref = loss_and_grads(naive_loss, img, txt, scale)
    world = len(ranks)
    key = f"{torch.float64}11"
    torch.testing.assert_close(sum(r["tiled" + key]["loss"] for r in ranks) / world, ref["loss"])
    for rank, res in enumerate(ranks):
        # Gathers with gradient sum every rank's derivative into the local rows; DDP's mean divides by W.
        torch.testing.assert_close(res["tiled" + key]["img"], world * ref["img"][_rows(rank, EQUAL)])
        torch.testing.assert_close(res["tiled" + key]["txt"], world * ref["txt"][_rows(rank, EQUAL)])
        # local_loss=False: every rank computes the whole global loss.
        torch.testing.assert_close(res[f"tiled{torch.float64}01"]["loss"], ref["loss"])


def test_distributed_unequal_batches(ranks):
    for res in ranks:
        assert_same(res["unequal_tiled"], res["unequal_clip"], rtol=1e-12)
