"""SigLipLoss against open_clip's SigLipLoss and a hand-written global reference, in one process and across gloo
ranks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.models.losses import create_loss
from clipforge.models.losses_siglip import SigLipLoss
from clipforge.models.spec import LossSpec

from dist_utils import open_clip_loss, run_distributed

torch.set_num_threads(1)
DIM = 16


def features(n: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    # SigLIP's initialisation: temperature 10, bias -10.
    return img.to(dtype), txt.to(dtype), torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)


def loss_and_grads(loss_fn, img, txt, scale, bias):
    img, txt, scale, bias = (t.detach().clone().requires_grad_(True) for t in (img, txt, scale, bias))
    loss = loss_fn(img, txt, scale, bias)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad, "bias": bias.grad}


def assert_same(ours: dict, ref: dict, rtol: float):
    for k in ("loss", "img", "txt", "scale", "bias"):
        atol = rtol * ref[k].abs().max().item()
        torch.testing.assert_close(ours[k], ref[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def reference_rank_loss(img, txt, scale, bias, rows: slice):
    """One rank's loss: its images against every text of the global batch, by the definition."""
    logits = scale * img[rows] @ txt.T + bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(logits.shape[0]), torch.arange(rows.start, rows.stop)] = 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_single_process_equals_open_clip(dtype, rtol):
    img, txt, scale, bias = features(24, dtype)
    ours = loss_and_grads(SigLipLoss(), img, txt, scale, bias)
    assert_same(ours, loss_and_grads(open_clip_loss().SigLipLoss(), img, txt, scale, bias), rtol)
    assert_same(ours, loss_and_grads(lambda *a: reference_rank_loss(*a, slice(0, 24)), img, txt, scale, bias), rtol)


def test_loss_rewards_alignment_and_trains_the_bias():
    eye = torch.eye(8, dtype=torch.float64)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    aligned = SigLipLoss()(eye, eye, scale, bias)
    shuffled = SigLipLoss()(eye, eye.roll(1, dims=0), scale, bias)
    assert aligned < 0.1 < shuffled
    res = loss_and_grads(SigLipLoss(), *features(8))
    assert res["bias"].abs() > 0


def test_missing_bias_and_bad_shapes_are_clear_errors():
    img, txt, scale, _ = features(4)
    with pytest.raises(ValueError, match="logit bias"):
        SigLipLoss()(img, txt, scale)
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        SigLipLoss()(img, txt[:3], scale, torch.tensor(0.0))
    assert isinstance(create_loss(LossSpec(kind="siglip")), SigLipLoss)


def _rows(rank: int, sizes: list[int]) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _rank_worker(rank: int, world: int, layouts: dict[str, list[int]]) -> dict:
    """Per layout (how the global batch is split over the ranks): our losses and, for equal splits, open_clip's."""
    out = {}
    for name, sizes in layouts.items():
        for dtype in (torch.float64, torch.float32):
            img, txt, scale, bias = features(sum(sizes), dtype)
            rows = _rows(rank, sizes)
            args = (img[rows], txt[rows], scale, bias)
            out[f"{name}bidir{dtype}"] = loss_and_grads(SigLipLoss(), *args)
            out[f"{name}ring{dtype}"] = loss_and_grads(SigLipLoss(bidirectional=False), *args)
            if len(set(sizes)) == 1:
                oc = open_clip_loss().SigLipLoss(rank=rank, world_size=world)
                out[f"{name}open_clip{dtype}"] = loss_and_grads(oc, *args)
    return out


# 2 ranks: a single hop; 3 ranks: texts travel both ways round the ring at once. Unequal rank batches
# need receive buffers sized by the sender.
LAYOUTS = {2: {"equal": [4, 4], "unequal": [5, 2]}, 3: {"equal": [3, 3, 3], "unequal": [4, 1, 3]}}


@pytest.fixture(scope="module", params=sorted(LAYOUTS), ids=lambda w: f"{w}ranks")
def world(request):
    layouts = LAYOUTS[request.param]
    return layouts, run_distributed(_rank_worker, world_size=request.param, args=(layouts,))


def test_distributed_equals_open_clip(world):
    _, ranks = world
    for res in ranks:
        assert_same(res[f"equalbidir{torch.float64}"], res[f"equalopen_clip{torch.float64}"], rtol=1e-12)
        assert_same(res[f"equalbidir{torch.float32}"], res[f"equalopen_clip{torch.float32}"], rtol=1e-5)


@pytest.mark.parametrize("layout", ["equal", "unequal"])
def test_distributed_equals_the_global_definition(world, layout):
    """Each rank's loss is its rows' share; the gradients reaching each rank's features are the sum over ranks."""
    layouts, ranks = world
    sizes = layouts[layout]
    img, txt, scale, bias = features(sum(sizes))

    def all_rank_losses(i, t, s, b):
        return sum(reference_rank_loss(i, t, s, b, _rows(r, sizes)) for r in range(len(sizes)))

    ref = loss_and_grads(all_rank_losses, img, txt, scale, bias)
    for variant in ("bidir", "ring"):
        key = f"{layout}{variant}{torch.float64}"
        for rank, res in enumerate(ranks):
            rows = _rows(rank, sizes)
            torch.testing.assert_close(res[key]["loss"], reference_rank_loss(img, txt, scale, bias, rows))
            torch.testing.assert_close(res[key]["img"], ref["img"][rows])
            torch.testing.assert_close(res[key]["txt"], ref["txt"][rows])
        torch.testing.assert_close(sum(r[key]["scale"] for r in ranks), ref["scale"])
        torch.testing.assert_close(sum(r[key]["bias"] for r in ranks), ref["bias"])


def test_model_with_logit_bias_trains_with_siglip(tmp_path):
    from clipforge.models import ModelSpec, ProjectionHeads, create_model, tower_features
    from clipforge.models.checkpoint_files import save_checkpoint

    spec = ModelSpec(name="tiny", init_logit_bias=-10.0)
    bundle = create_model(spec)
    model = bundle.model.train()
    assert model.logit_bias.item() == -10.0 and model.logit_bias.requires_grad
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = bundle.tokenizer(["a red cat", "a blue car", "an old tree", "a small boat"])
    out = model(images, tokens)
    assert len(out) == 4 and out[3] is model.logit_bias
    loss = SigLipLoss()(*out)
    loss.backward()
    assert model.logit_bias.grad.abs() > 0 and model.visual.proj.grad.abs().sum() > 0
    # Heads-only training on cached tower features gets the bias too.
    model.eval()
    heads = ProjectionHeads(model)
    head_out = heads(tower_features(model, images=images), tower_features(model, tokens=tokens))
    assert len(head_out) == 4
    for a, b in zip(head_out, model(images, tokens)):
        torch.testing.assert_close(a, b)
    # The bias is part of the checkpoint and comes back with the same spec.
    model.logit_bias.data.fill_(-3.5)
    path = save_checkpoint(str(tmp_path / "ckpt"), model.state_dict(), {"step": 1})
    reloaded = create_model(spec.model_copy(update={"checkpoint": path})).model
    assert reloaded.logit_bias.item() == -3.5
    assert getattr(create_model(ModelSpec(name="tiny")).model, "logit_bias", None) is None
