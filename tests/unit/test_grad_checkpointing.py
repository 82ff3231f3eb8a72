"""Activation checkpointing per tower: it really recomputes, and loss and gradients stay the same."""
from __future__ import annotations

import pytest
import torch

from clipforge.models import ModelSpec, create_model
from clipforge.models.grad_checkpointing import set_grad_checkpointing
from clipforge.models.losses import ClipLoss
from clipforge.models.spec import TowerSwitch

torch.set_num_threads(1)
CAPTIONS = ["a cat on a sofa", "a dog in the park", "a red car", "two birds in the sky"]


def watched_modules(model, image_block: int = 3, text_block: int = 2) -> dict[str, torch.nn.Module]:
    """A module inside one block of each tower's checkpointed sequence.

    Inside, because Hugging Face checkpoints a layer's forward (its hooks run once either way).
    """
    if hasattr(model.visual, "trunk"):
        image = model.visual.trunk.blocks[image_block][0].conv_pw
    else:
        image = model.visual.transformer.resblocks[min(image_block, 1)].mlp
    if hasattr(model, "text"):
        text = model.text.transformer.encoder.layer[text_block].intermediate
    else:
        text = model.transformer.resblocks[min(text_block, 1)].mlp
    return {"image": image, "text": text}


def run_step(bundle, switch, watch: dict[str, torch.nn.Module] | None = None) -> tuple[dict, dict]:
    """One forward/backward in training mode: loss and gradients, and how often each watched module ran."""
    model = bundle.model
    set_grad_checkpointing(model, image=switch.image, text=switch.text)
    model.train()
    model.zero_grad()
    watch = watch or watched_modules(model)
    calls = {name: 0 for name in watch}
    hooks = []
    for name, module in watch.items():
        def count(module, args, name=name):
            calls[name] += 1
        hooks.append(module.register_forward_pre_hook(count))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    torch.manual_seed(0)
    images = torch.randn(4, 3, size, size)
    loss = ClipLoss()(*model(images, bundle.tokenizer(CAPTIONS)))
    loss.backward()
    for h in hooks:
        h.remove()
    result = {"loss": loss.detach()} | {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, calls


@pytest.fixture(scope="module", params=["miniclip-effnet-minilm", "tiny"])
def bundle(request):
    # timm EfficientNet + Hugging Face BERT towers, and open_clip's own ViT + text transformer.
    return create_model(ModelSpec(name=request.param, pretrained_towers=False))


def test_same_loss_and_gradients_and_blocks_recomputed(bundle):
    reference, calls = run_step(bundle, TowerSwitch(image=False, text=False))
    assert calls == {"image": 1, "text": 1}
    for switch, recomputed in ((TowerSwitch(image=True, text=True), {"image": 2, "text": 2}),
                               (TowerSwitch(image=True, text=False), {"image": 2, "text": 1}),
                               (TowerSwitch(image=False, text=True), {"image": 1, "text": 2})):
        result, calls = run_step(bundle, switch)
        assert calls == recomputed, switch
        assert set(result) == set(reference)
        for name, value in reference.items():
            # BatchNorm statistics and kernels may reduce in another order in the recomputation.
            torch.testing.assert_close(result[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_checkpointing_with_a_frozen_stem_still_trains_the_open_blocks():
    """Non-reentrant checkpointing: open blocks whose input needs no gradient still get theirs (and recompute)."""
    spec = ModelSpec(name="miniclip-effnet-minilm", pretrained_towers=False, grad_checkpointing=True,
                     trainable={"image": {"last_blocks": 3}, "text": {"last_blocks": 2}})
    bundle = create_model(spec)
    frozen = watched_modules(bundle.model, image_block=3, text_block=2)
    open_ = watched_modules(bundle.model, image_block=6, text_block=4)
    watch = {"frozen_image": frozen["image"], "frozen_text": frozen["text"],
             "open_image": open_["image"], "open_text": open_["text"]}
    result, calls = run_step(bundle, TowerSwitch(image=True, text=True), watch)
    # Frozen blocks save nothing for backward, so nothing of theirs is recomputed; open blocks are.
    assert calls == {"frozen_image": 1, "frozen_text": 1, "open_image": 2, "open_text": 2}
    trained = {n for n in result if n != "loss"}
    assert {n for n, p in bundle.model.named_parameters() if p.requires_grad} == trained
    assert any(n.startswith("text.transformer.encoder.layer.4.") for n in trained)
    assert any(n.startswith("visual.trunk.blocks.6.") for n in trained)


def test_spec_switch_reaches_the_towers():
    bundle = create_model(ModelSpec(name="tiny", grad_checkpointing={"image": True, "text": False}))
    assert bundle.model.visual.transformer.grad_checkpointing and not bundle.model.transformer.grad_checkpointing
    bundle = create_model(ModelSpec(name="miniclip-effnet-minilm", pretrained_towers=False, grad_checkpointing=True))
    assert bundle.model.visual.trunk.grad_checkpointing
    hf = bundle.model.text.transformer
    assert (hf.is_activation_checkpointing if hasattr(hf, "is_activation_checkpointing")
            else hf.is_gradient_checkpointing)
