"""create_model: an architecture config -> an open_clip dual encoder with its transforms and tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from clipforge.models.errors import CheckpointError, ModelConfigError
from clipforge.models.registry import CLIPFORGE_SECTION
from clipforge.models.resolved_config import resolved_config
from clipforge.models.spec import ModelSpec
from clipforge.models.towers import OpenClipModel


class Tokenizer(Protocol):
    """What every tokenizer of a bundle offers (open_clip's, Hugging Face's through open_clip, clipforge's BPE)."""

    context_length: int

    def __call__(self, texts: list[str]) -> torch.Tensor: ...


@dataclass
class ModelBundle:
    """A built model and everything needed to feed it."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Tokenizer
    name: str
    config: dict[str, Any] = field(default_factory=dict)


def _hub_towers(cfg: dict[str, Any]) -> str:
    names = [f"timm {cfg['vision_cfg']['timm_model_name']!r}" if cfg["vision_cfg"].get("timm_model_name") else "",
             f"Hugging Face {cfg['text_cfg']['hf_model_name']!r}" if cfg["text_cfg"].get("hf_model_name") else ""]
    return " and ".join(n for n in names if n) or "none"


def _instantiate(cfg: dict[str, Any], name: str, from_hub: bool = False) -> OpenClipModel:
    """An open_clip CLIP (built-in text transformer) or CustomTextCLIP (Hugging Face text tower).

    Random init unless `from_hub`: then timm and Hugging Face towers named by hub name take their
    pretrained weights from the hub (or its local cache).
    """
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs = {k: v for k, v in cfg.items() if k != CLIPFORGE_SECTION}
    custom_text = bool(kwargs.pop("custom_text", False)) or bool(kwargs["text_cfg"].get("hf_model_name"))
    # Otherwise weights are never fetched from a hub at build time: towers named in the config are loaded
    # from local files afterwards, everything else starts from the seeded random init.
    kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "timm_model_pretrained": from_hub}
    if custom_text:
        kwargs["text_cfg"] = {**kwargs["text_cfg"], "hf_model_pretrained": from_hub}
    cls = CustomTextCLIP if custom_text else CLIP
    try:
        return cls(**kwargs, output_dict=False)
    except (OSError, RuntimeError, ValueError) as e:
        if not isinstance(e, OSError) and not from_hub:
            raise
        if cfg.get(CLIPFORGE_SECTION, {}).get("pretrained_hub"):
            hint = (f"its towers ({_hub_towers(cfg)}) come from the model hub, which clipforge does not contact "
                    "by default (HF_HUB_OFFLINE=1): set HF_HUB_OFFLINE=0 where the hub is reachable")
            if from_hub:
                hint += (", or model.pretrained_towers: false to build them without their weights (a Hugging Face "
                         "tower still needs its config and tokenizer files, from the hub or its local cache)")
        else:
            hint = "clipforge builds offline, so Hugging Face text towers must name a local model directory"
        raise ModelConfigError(f"model {name!r}: a tower's files are not available locally ({e}); {hint}") from e


def _load_pretrained_towers(model: OpenClipModel, extra: dict[str, Any]) -> None:
    from clipforge.models.pretrained import load_image_tower, load_text_tower

    if extra.get("pretrained_image"):
        load_image_tower(model.visual, extra["pretrained_image"], extra.get("pretrained_image_format", "timm"))
    if extra.get("pretrained_text"):
        load_text_tower(model.text, extra["pretrained_text"])


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    from clipforge.models.checkpoint_files import load_model_state
    from clipforge.models.pretrained import load_strict

    state = load_model_state(path)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    load_strict(model, state, f"checkpoint {path}", droppable_prefixes=("text.transformer.embeddings.position_ids",),
                error=CheckpointError)


def _transforms(cfg: dict[str, Any], model: OpenClipModel) -> tuple[Callable, Callable]:
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    pre = dict(cfg.get(CLIPFORGE_SECTION, {}).get("preprocess", {}))
    train_scale = tuple(pre.pop("train_scale", (0.9, 1.0)))
    for key in ("mean", "std"):
        if key in pre:
            pre[key] = tuple(pre[key])
    pcfg = PreprocessCfg(size=model.visual.image_size, **pre)
    return (image_transform_v2(pcfg, is_train=True, aug_cfg=AugmentationCfg(scale=train_scale)),
            image_transform_v2(pcfg, is_train=False))


def _tokenizer(cfg: dict[str, Any], name: str, source: str) -> Tokenizer:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if source.startswith("open_clip:"):
        import open_clip

        return open_clip.get_tokenizer(name)

    text_cfg = cfg["text_cfg"]
    context_length = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                           **(text_cfg.get("tokenizer_kwargs") or {}))
    return SimpleTokenizer(context_length=context_length, **(text_cfg.get("tokenizer_kwargs") or {}))


def _set_grad_checkpointing(model: torch.nn.Module, switch) -> None:
    from clipforge.models.grad_checkpointing import set_grad_checkpointing

    if switch is True:
        set_grad_checkpointing(model, image=True, text=True)
    elif switch is not False:
        set_grad_checkpointing(model, image=switch.image, text=switch.text)


def create_model(spec: ModelSpec) -> ModelBundle:
    """Build `spec.name`, load its pretrained towers, then `spec.checkpoint`, then apply `spec.trainable`.

    `spec.tokenizer` (or the config's clipforge.tokenizer) swaps in a clipforge BPE tokenizer, sizing the
    text transformer's vocabulary to it; `spec.init_logit_bias` adds a learnable logit bias (siglip).

    The model is returned in eval mode; call `.train()` to train it. With `trainable: heads` the
    trunks stay in eval mode regardless (see towers.freeze_trunks).
    """
    from clipforge.models.towers import freeze_trunks

    name, cfg, source, bpe = resolved_config(spec)
    extra = cfg.get(CLIPFORGE_SECTION, {})
    # A checkpoint holds every weight, so hub weights would only be overwritten.
    from_hub = bool(extra.get("pretrained_hub")) and spec.pretrained_towers and not spec.checkpoint
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model = _instantiate(cfg, name, from_hub)
    if spec.checkpoint:
        # The checkpoint holds every weight, so the pretrained tower files need not be read.
        _load_checkpoint(model, spec.checkpoint)
    elif spec.pretrained_towers:
        _load_pretrained_towers(model, extra)
    if spec.trainable == "heads":
        freeze_trunks(model)
    elif spec.trainable != "all":
        from clipforge.models.regimes import apply_regime

        # A schedule starts in its first stage; the trainer re-applies the regime at stage changes.
        apply_regime(model, spec.trainable)
    _set_grad_checkpointing(model, spec.grad_checkpointing)
    tokenizer = bpe or _tokenizer(cfg, name, source)
    # An HF tower reports its position-table size; what callers need is the tokenizer's length.
    model.context_length = tokenizer.context_length
    preprocess_train, preprocess_val = _transforms(cfg, model)
    model.eval()
    return ModelBundle(model=model, preprocess_train=preprocess_train, preprocess_val=preprocess_val,
                       tokenizer=tokenizer, name=name, config=cfg)
