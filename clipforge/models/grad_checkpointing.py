"""Activation checkpointing, switched per tower.

Each tower's own mechanism is used (timm's checkpoint_seq, open_clip's transformer flag, Hugging Face's
layer checkpointing), always in the non-reentrant form: reentrant checkpointing returns no gradient to
the checkpointed blocks when their input does not require grad, which is exactly the case of a tower
whose stem is frozen by a fine-tuning regime (and needless gradient flow through frozen layers is
switched off). Hugging Face layers checkpoint only in training mode.
"""
from __future__ import annotations

import warnings

from torch import nn

from clipforge.models.errors import ModelConfigError
from clipforge.models.towers import OpenClipModel, unwrap


def _image_tower(model: OpenClipModel, enable: bool) -> None:
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        if not hasattr(trunk, "set_grad_checkpointing"):
            raise ModelConfigError(f"timm model {type(trunk).__name__} does not support activation checkpointing")
        trunk.set_grad_checkpointing(enable)
    elif hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(enable)
    elif enable:
        raise ModelConfigError(f"image tower {type(visual).__name__} does not support activation checkpointing")


def _text_tower(model: OpenClipModel, enable: bool) -> None:
    text = getattr(model, "text", None)
    if text is None:
        # open_clip's built-in text transformer lives on the CLIP model itself.
        model.transformer.grad_checkpointing = enable
        return
    hf = getattr(text, "transformer", None)
    if hf is None or not hasattr(hf, "supports_gradient_checkpointing"):
        if hasattr(text, "set_grad_checkpointing"):
            text.set_grad_checkpointing(enable)
            return
        raise ModelConfigError(f"text tower {type(text).__name__} does not support activation checkpointing")
    if not hf.supports_gradient_checkpointing:
        if enable:
            raise ModelConfigError(f"Hugging Face model {type(hf).__name__} does not support activation checkpointing")
        return
    with warnings.catch_warnings():
        # Older transformers name these gradient_checkpointing_*; newer ones warn that this name is deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        if enable:
            if hasattr(hf, "activation_checkpointing_enable"):
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # Hugging Face also makes the embeddings' output require grad, which only reentrant checkpointing
            # needs; with a frozen stem it would run the backward pass through every frozen layer for nothing.
            if hasattr(hf, "disable_input_require_grads"):
                hf.disable_input_require_grads()
        else:
            getattr(hf, "activation_checkpointing_disable", hf.gradient_checkpointing_disable)()


def set_grad_checkpointing(model: nn.Module, image: bool, text: bool) -> None:
    """Turn activation checkpointing on or off in each tower (recomputes activations in backward to save memory)."""
    model = unwrap(model)
    _image_tower(model, image)
    _text_tower(model, text)
