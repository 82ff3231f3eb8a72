"""Typed spec of a model: which architecture, which weights, what trains."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from clipforge.specbase import Spec


class ModelSpec(Spec):
    name: str = Field(
        ...,
        description="Architecture: a clipforge config name (clipforge/models/configs/NAME.json), an open_clip "
        "model name, or a path to a JSON config.",
    )
    checkpoint: str | None = Field(
        None,
        description="Weights to load after building: a clipforge checkpoint directory, a training run directory "
        "(its latest complete checkpoint is used), or a state-dict file. Local or any fsspec path.",
    )
    trainable: Literal["all", "heads"] = Field(
        "all",
        description="`heads`: only the projection heads and the temperature train (towers frozen); `all`: everything.",
    )
    grad_checkpointing: bool = Field(False, description="Activation checkpointing in both towers.")
    init_seed: int = Field(0, description="Seed for randomly initialised parameters (heads, from-scratch towers).")


class LossSpec(Spec):
    kind: Literal["clip"] = Field("clip", description="Symmetric InfoNCE over the global batch.")
    local_loss: bool = Field(True, description="Each rank computes its rows against all columns (OpenCLIP local loss).")
    gather_with_grad: bool = Field(True, description="All-gather features with gradient (needed for a correct loss).")
    max_logit_scale: float = Field(100.0, gt=0, description="Clamp of exp(logit_scale).")
