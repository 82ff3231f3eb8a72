"""The shipped architecture configs: the from-scratch Mini-CLIP builds and runs; hub-tower configs fail clearly
offline."""
from __future__ import annotations

import pytest
import torch

from clipforge.models import ModelConfigError, ModelSpec, create_model, list_models
from clipforge.models.registry import load_config

torch.set_num_threads(1)
HUB_CONFIGS = {"vit-s16-roberta-base": "vit_small_patch16_224", "resnet101-roberta-base": "resnet101"}


@pytest.fixture(autouse=True, scope="module")
def offline():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("these tests build hub-named towers and must not reach the network: run with HF_HUB_OFFLINE=1")


def test_new_configs_are_listed_and_parse():
    names = list_models()
    for name in ["miniclip-vit-scratch", *HUB_CONFIGS]:
        assert name in names
        _, cfg, source = load_config(name)
        assert source.endswith(f"{name}.json") and cfg["embed_dim"] > 0
    for name, timm_name in HUB_CONFIGS.items():
        _, cfg, _ = load_config(name)
        assert cfg["vision_cfg"]["timm_model_name"] == timm_name
        assert cfg["text_cfg"]["hf_model_name"] == "roberta-base"
        assert cfg["clipforge"]["pretrained_hub"] is True


def test_miniclip_vit_scratch_builds_and_runs_forward():
    bundle = create_model(ModelSpec(name="miniclip-vit-scratch"))
    model = bundle.model
    assert type(model).__name__ == "CLIP"
    assert model.visual.image_size == (128, 128) and len(model.visual.transformer.resblocks) == 4
    assert model.visual.transformer.resblocks[0].attn.num_heads == 4
    assert len(model.transformer.resblocks) == 4 and model.transformer.resblocks[0].attn.num_heads == 4
    tokens = bundle.tokenizer(["a cat on a sofa", "a dog"])
    assert tokens.shape == (2, 64)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img, txt, scale = model(images, tokens)
    assert img.shape == txt.shape == (2, 256)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    assert torch.isfinite(txt).all() and scale.item() > 1


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_towers_offline_give_a_clear_error(name):
    with pytest.raises(ModelConfigError) as err:
        create_model(ModelSpec(name=name))
    message = str(err.value)
    assert name in message and "roberta-base" in message and HUB_CONFIGS[name] in message
    assert "HF_HUB_OFFLINE" in message and "pretrained_towers: false" in message


def test_hub_config_without_pretrained_weights_needs_only_the_architecture_files():
    """Random init needs no weights, but RoBERTa's config and tokenizer files still come from the hub or its cache."""
    try:
        bundle = create_model(ModelSpec(name="vit-s16-roberta-base", pretrained_towers=False))
    except ModelConfigError as e:
        assert "roberta-base" in str(e) and "config and tokenizer" not in str(e)
        assert "HF_HUB_OFFLINE" in str(e)
    else:  # the files are in the local cache
        assert type(bundle.model.text.transformer).__name__.startswith("Roberta")
