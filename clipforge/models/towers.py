"""The split of each open_clip tower into a frozen trunk and a trainable projection head.

Heads-only training (`trainable: heads`) updates the two projection heads and the temperature;
the trunks stay fixed, so their outputs (`tower_features`) can be computed once and
`ProjectionHeads` trained on them. ProjectionHeads shares the model's own parameters, so
training it trains the model, and a checkpoint of the model holds the trained heads.

Supported towers: open_clip's TimmModel (head: `visual.head`) and VisionTransformer
(head: `visual.proj`) for images; open_clip's HFTextEncoder (head: `text.proj`) and the built-in
CLIP text transformer (head: `text_projection`) for text.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.errors import ModelConfigError

# An open_clip model or one of its towers. open_clip ships no type information, and torch types every attribute
# of a module as `Tensor | Module`, so code that reaches into a tower's own attributes (`visual.trunk`,
# `text.config.pad_token_id`) holds the model untyped.
OpenClipModel = Any

def unwrap(model: nn.Module) -> nn.Module:
    """The CLIP model inside DDP / DataParallel / similar wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _image_kind(model: nn.Module) -> str:
    visual = model.visual
    if hasattr(visual, "trunk") and hasattr(visual, "head"):
        return "timm"
    if hasattr(visual, "proj") and hasattr(visual, "conv1") and hasattr(visual, "transformer"):
        if visual.proj is None:
            raise ModelConfigError("the vision transformer has no projection (proj) to train as a head")
        return "vit"
    raise ModelConfigError(
        f"image tower {type(visual).__name__} has no separable projection head; heads-only training and "
        "tower_features support timm and ViT image towers"
    )


def _text_kind(model: nn.Module) -> str:
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "pooler") and hasattr(text, "proj"):
        return "hf"
    if text is None and getattr(model, "text_projection", None) is not None and hasattr(model, "token_embedding"):
        return "clip"
    raise ModelConfigError(
        f"text tower of {type(model).__name__} has no separable projection head; heads-only training and "
        "tower_features support Hugging Face and open_clip transformer text towers"
    )


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names (in `model.named_parameters()`) of the two projection heads, the temperature and any logit bias."""
    model = unwrap(model)
    heads = ({"timm": "visual.head", "vit": "visual.proj"}[_image_kind(model)],
             {"hf": "text.proj", "clip": "text_projection"}[_text_kind(model)], "logit_scale", "logit_bias")
    return [n for n, _ in model.named_parameters() if any(n == h or n.startswith(h + ".") for h in heads)]


def trunk_modules(model: OpenClipModel) -> list[nn.Module]:
    """The modules whose parameters form the frozen trunks (everything but the heads)."""
    model = unwrap(model)
    image = [model.visual.trunk] if _image_kind(model) == "timm" else [model.visual]
    if _text_kind(model) == "hf":
        text = [model.text.transformer]
    else:
        text = [model.token_embedding, model.transformer, model.ln_final]
    return image + text


def _force_eval(module: nn.Module, args: tuple) -> None:
    if module.training:
        nn.Module.train(module, False)


def pin_eval(module: nn.Module) -> None:
    """Run `module` in eval mode whatever `.train()` its parents receive.

    A frozen trunk must compute the same features whether or not its model is training: BatchNorm
    statistics must not drift and dropout must not fire (that would also make cached features differ
    from the live ones). A forward pre-hook (a plain function, so the model still pickles and deep-copies)
    switches the trunk back to eval mode before each call.
    """
    module.register_forward_pre_hook(_force_eval)
    nn.Module.train(module, False)


def freeze_trunks(model: nn.Module) -> None:
    """requires_grad=False everywhere except the heads and the temperature; trunks pinned to eval mode."""
    model = unwrap(model)
    keep = set(head_parameter_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    for m in trunk_modules(model):
        pin_eval(m)


@contextlib.contextmanager
def _without_parameter(module: nn.Module, name: str) -> Iterator[None]:
    """Temporarily set a projection parameter to None, which open_clip's forward treats as `no projection`."""
    saved = getattr(module, name)
    setattr(module, name, None)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _image_trunk(model: OpenClipModel, images: torch.Tensor) -> torch.Tensor:
    if _image_kind(model) == "timm":
        return model.visual.trunk(images)
    with _without_parameter(model.visual, "proj"):
        out = model.visual(images)
    return out[0] if isinstance(out, tuple) else out


def _trim_padding(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the columns that are padding in every row.

    Padding is masked out of attention and pooling, so the features do not change; captions are
    much shorter than the context length, and the attention layers' cost falls with the length.
    """
    used = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def _text_trunk(model: OpenClipModel, tokens: torch.Tensor) -> torch.Tensor:
    if _text_kind(model) == "hf":
        text = model.text
        tokens = _trim_padding(tokens, text.config.pad_token_id)
        attn_mask = (tokens != text.config.pad_token_id).long()
        out = text.transformer(input_ids=tokens, attention_mask=attn_mask)
        return text.pooler(out, attn_mask)
    with _without_parameter(model, "text_projection"):
        return model.encode_text(tokens, normalize=False)


@torch.no_grad()
def tower_features(model: nn.Module, images: torch.Tensor | None = None,
                   tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Output of one tower's trunk (before its projection head), for `images` or `tokens` (exactly one)."""
    if images is not None and tokens is None:
        return _image_trunk(unwrap(model), images)
    if tokens is not None and images is None:
        return _text_trunk(unwrap(model), tokens)
    raise ValueError("tower_features takes exactly one of images= or tokens=")


class ProjectionHeads(nn.Module):
    """The two projection heads and the temperature of a CLIP model, sharing the model's parameters.

    forward(tower_features(m, images=x), tower_features(m, tokens=t)) equals m(x, t).
    """

    # Which of these exist depends on the towers' kinds (see __init__).
    image_head: nn.Module
    image_proj: torch.Tensor
    text_head: nn.Module
    text_proj: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None

    def __init__(self, model: OpenClipModel):
        super().__init__()
        model = unwrap(model)
        self.image_kind, self.text_kind = _image_kind(model), _text_kind(model)
        # Registering the model's own modules/parameters (not copies) makes the heads share them.
        if self.image_kind == "timm":
            self.image_head = model.visual.head
        else:
            self.image_proj = model.visual.proj
        if self.text_kind == "hf":
            self.text_head = model.text.proj
        elif isinstance(model.text_projection, nn.Module):
            self.text_head = model.text_projection
        else:
            self.text_proj = model.text_projection
        self.logit_scale = model.logit_scale
        # A model with a logit bias (siglip) returns it as a 4th output; so do its heads.
        self.logit_bias = getattr(model, "logit_bias", None)

    def project_image(self, feats: torch.Tensor) -> torch.Tensor:
        return self.image_head(feats) if self.image_kind == "timm" else feats @ self.image_proj

    def project_text(self, feats: torch.Tensor) -> torch.Tensor:
        return self.text_head(feats) if hasattr(self, "text_head") else feats @ self.text_proj

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = F.normalize(self.project_image(image_feats), dim=-1)
        text = F.normalize(self.project_text(text_feats), dim=-1)
        if self.logit_bias is not None:
            return image, text, self.logit_scale.exp(), self.logit_bias
        return image, text, self.logit_scale.exp()
