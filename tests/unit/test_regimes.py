"""Fine-tuning regimes: which blocks of each tower train, frozen weights never move, staged schedules."""
from __future__ import annotations

import json

import pytest
import torch

from clipforge.models import ModelConfigError, ModelSpec, create_model, head_parameter_names
from clipforge.models.losses import ClipLoss
from clipforge.models.regimes import apply_regime, schedule_parameter_names, stage_at, tower_layout, trainable_names
from clipforge.models.registry import CONFIG_DIR
from clipforge.models.spec import TowerRegime

torch.set_num_threads(1)
CAPTIONS = ["a cat on a sofa", "a dog in the park", "a red car", "two birds in the sky"]


@pytest.fixture(scope="module")
def effnet_minilm():
    """timm EfficientNet-Lite0 image tower, Hugging Face BERT (MiniLM) text tower; random weights are enough here."""
    return create_model(ModelSpec(name="miniclip-effnet-minilm", pretrained_towers=False))


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    cfg = json.loads((CONFIG_DIR / "tiny.json").read_text())
    cfg["vision_cfg"] = {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "linear",
                         "image_size": 224}
    path = tmp_path_factory.mktemp("cfg") / "timm-vit-tiny.json"
    path.write_text(json.dumps(cfg))
    return create_model(ModelSpec(name=str(path)))


def batch(bundle, n: int = 4):
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, bundle.tokenizer(CAPTIONS[:n])


def train_steps(model, inputs, steps: int = 2):
    """AdamW with weight decay over *every* parameter: frozen ones must still not move."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        ClipLoss()(*model(*inputs)).backward()
        opt.step()


def check_frozen_stay_bit_identical(bundle, regime) -> list[str]:
    model = bundle.model
    names = apply_regime(model, regime)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batch(bundle))
    params = dict(model.named_parameters())
    for n, p in params.items():
        if n in names:
            assert p.requires_grad, n
        else:
            assert not p.requires_grad and p.grad is None, n
            assert torch.equal(p, before[n]), f"frozen {n} moved"
    moved = [n for n in names if not torch.equal(params[n], before[n])]
    assert len(moved) >= 0.9 * len(names), sorted(set(names) - set(moved))
    return names


def test_effnet_and_bert_last_blocks(effnet_minilm):
    model = effnet_minilm.model
    image, text = tower_layout(model, "image"), tower_layout(model, "text")
    assert len(image.blocks) == 16 and len(text.blocks) == 6  # Lite0's 16 MBConv blocks, MiniLM's 6 layers
    regime = TowerRegime(image={"last_blocks": 2}, text={"last_blocks": 1})
    names = check_frozen_stay_bit_identical(effnet_minilm, regime)
    trunk = {n.removeprefix("visual.trunk.").split(".weight")[0].split(".bias")[0] for n in names
             if n.startswith("visual.trunk.")}
    assert {"blocks.6.0.conv_pw", "blocks.5.3.conv_pw", "conv_head", "bn2"} <= trunk
    assert not any(t.startswith(("blocks.5.2", "blocks.0", "conv_stem", "bn1")) for t in trunk)
    bert = {n for n in names if n.startswith("text.transformer.")}
    assert bert and all(n.startswith("text.transformer.encoder.layer.5.") for n in bert)
    assert {"text.proj.weight", "visual.head.proj.weight", "logit_scale"} <= set(names)
    # BatchNorm inside frozen blocks keeps its running statistics: it runs in eval mode in a training model.
    trunk = model.visual.trunk
    frozen_bn, live_bn = trunk.blocks[0][0].bn1, trunk.blocks[6][0].bn1
    stats = [m.running_mean.clone() for m in (frozen_bn, live_bn)]
    train_steps(model, batch(effnet_minilm), steps=1)
    assert not frozen_bn.training and live_bn.training
    assert torch.equal(frozen_bn.running_mean, stats[0]) and not torch.equal(live_bn.running_mean, stats[1])


def test_timm_vit_last_blocks(timm_vit):
    layout = tower_layout(timm_vit.model, "image")
    assert len(layout.blocks) == 12
    names = check_frozen_stay_bit_identical(timm_vit, TowerRegime(image={"last_blocks": 3}, text="head"))
    trunk = [n for n in names if n.startswith("visual.trunk.")]
    assert {n.split(".")[3] for n in trunk if ".blocks." in n} == {"9", "10", "11"}
    assert "visual.trunk.norm.weight" in trunk and "visual.trunk.patch_embed.proj.weight" not in names
    assert {n for n in names if not n.startswith("visual.")} == {"logit_scale", "text_projection"}


def test_open_clip_vit_and_text_transformer_last_blocks():
    tiny = create_model(ModelSpec(name="tiny"))
    names = check_frozen_stay_bit_identical(tiny, {"image": {"last_blocks": 1}, "text": {"last_blocks": 0}})
    image = {n for n in names if n.startswith("visual.")}
    assert image == {n for n, _ in tiny.model.named_parameters()
                     if n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post", "visual.proj"))}
    assert {n for n in names if not n.startswith("visual.")} == {"text_projection", "logit_scale"}


def test_heads_and_all_regimes(effnet_minilm):
    model = effnet_minilm.model
    assert apply_regime(model, "heads") == head_parameter_names(model)
    assert apply_regime(model, "all") == [n for n, _ in model.named_parameters()]
    assert all(p.requires_grad for p in model.parameters())
    both_heads = {"image": "head", "text": "head"}
    assert set(trainable_names(model, both_heads)) == set(head_parameter_names(model))


def test_too_many_blocks_is_a_clear_error(effnet_minilm):
    with pytest.raises(ModelConfigError, match="only 6 blocks"):
        apply_regime(effnet_minilm.model, {"image": "all", "text": {"last_blocks": 7}})


def test_schedule_of_stages(effnet_minilm):
    model = effnet_minilm.model
    schedule = [{"until_step": 100, "trainable": "heads"},
                {"until_step": 300, "trainable": {"image": {"last_blocks": 2}, "text": {"last_blocks": 2}}},
                {"trainable": "all"}]
    assert stage_at(schedule, step=0) == "heads" and stage_at(schedule, step=99) == "heads"
    assert isinstance(stage_at(schedule, step=100), TowerRegime)
    assert stage_at(schedule, step=300) == "all"
    heads = apply_regime(model, schedule, step=5)
    middle = apply_regime(model, schedule, step=150)
    assert set(heads) < set(middle) < set(apply_regime(model, schedule, step=10_000))
    assert schedule_parameter_names(model, schedule) == [n for n, _ in model.named_parameters()]
    by_epoch = [{"until_epoch": 1, "trainable": "heads"}, {"trainable": "all"}]
    assert stage_at(by_epoch, step=10_000, epoch=0) == "heads" and stage_at(by_epoch, epoch=1) == "all"
    with pytest.raises(ValueError, match="increase"):
        stage_at([{"until_step": 5, "trainable": "heads"}, {"until_step": 5, "trainable": "all"}])


def test_create_model_applies_the_regime_from_the_spec():
    spec = ModelSpec(name="tiny", trainable={"image": {"last_blocks": 1}, "text": "all"})
    model = create_model(spec).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in trainable
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in trainable
    assert "visual.conv1.weight" not in trainable and "token_embedding.weight" in trainable
    staged = ModelSpec(name="tiny", trainable=[{"until_epoch": 1, "trainable": "heads"}, {"trainable": "all"}])
    model = create_model(staged).model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(head_parameter_names(model))
