"""Dual-encoder models built through open_clip, their losses, optimizers, tokenizers and checkpoint format.

Names are imported lazily: `clipforge.models.spec` is needed by every job spec, and importing
open_clip (timm, transformers) costs seconds that spec parsing should not pay.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelBundle": "factory",
    "create_model": "factory",
    "list_models": "registry",
    "tower_features": "towers",
    "ProjectionHeads": "towers",
    "head_parameter_names": "towers",
    "ClipLoss": "losses",
    "create_loss": "losses",
    "clamp_logit_scale": "losses",
    "save_checkpoint": "checkpoint_files",
    "find_latest_checkpoint": "checkpoint_files",
    "load_model_state": "checkpoint_files",
    "load_meta": "checkpoint_files",
    "load_optimizer_state": "checkpoint_files",
    "load_extra": "checkpoint_files",
    "TiledClipLoss": "losses_tiled",
    "SigLipLoss": "losses_siglip",
    "accumulated_step": "accumulation",
    "AdamWBF16State": "adamw_bf16",
    "BPETokenizer": "tokenizer_bpe",
    "train_bpe_tokenizer": "tokenizer_bpe",
    "apply_regime": "regimes",
    "stage_at": "regimes",
    "schedule_parameter_names": "regimes",
    "set_grad_checkpointing": "grad_checkpointing",
    "ModelSpec": "spec",
    "LossSpec": "spec",
    "ModelConfigError": "errors",
    "PretrainedWeightsError": "errors",
    "CheckpointError": "errors",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - the lazy exports, each named once (in _EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
