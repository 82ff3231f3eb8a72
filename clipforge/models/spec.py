"""Typed spec of a model: which architecture, which weights, what trains."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from clipforge.models.registry import model_name_problem
from clipforge.specbase import Spec, checking_user_spec


class TowerBlocks(Spec):
    """Fine-tune only the top of a tower."""

    last_blocks: int = Field(
        ...,
        ge=0,
        description="Train the tower's last N blocks and everything after them (final norm, pooling, projection "
        "head); earlier blocks and the stem/embeddings stay frozen. 0 trains only the projection head.",
    )


TowerTrainable = Union[Literal["all", "head"], TowerBlocks]


class TowerRegime(Spec):
    """What trains in each tower; the temperature (and logit bias) always train."""

    image: TowerTrainable = Field("all", description="`all`, `head` (projection only) or {last_blocks: N}.")
    text: TowerTrainable = Field("all", description="`all`, `head` (projection only) or {last_blocks: N}.")


class TrainableStage(Spec):
    """One stage of a fine-tuning schedule: `trainable` applies until the given step or epoch (exclusive)."""

    until_step: int | None = Field(None, ge=1, description="The stage ends before this optimizer step (0-based).")
    until_epoch: int | None = Field(None, ge=1, description="The stage ends when this many epochs are done.")
    trainable: Union[Literal["all", "heads"], TowerRegime] = Field(..., description="What trains in this stage.")

    @model_validator(mode="after")
    def _one_end(self) -> "TrainableStage":
        if self.until_step is not None and self.until_epoch is not None:
            raise ValueError("a stage ends at until_step or at until_epoch, not both")
        return self


def _trainable_form(value) -> str:
    if isinstance(value, list):
        return "stages"
    return "towers" if isinstance(value, (dict, TowerRegime)) else "name"


# Chosen by shape, so a mistake is reported against the one form it was meant as.
Trainable = Annotated[
    Union[
        Annotated[Literal["all", "heads"], Tag("name")],
        Annotated[TowerRegime, Tag("towers")],
        Annotated[list[TrainableStage], Tag("stages")],
    ],
    Discriminator(_trainable_form),
]


class TowerSwitch(Spec):
    image: bool = Field(False, description="Activation checkpointing in the image tower.")
    text: bool = Field(False, description="Activation checkpointing in the text tower.")


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
    trainable: Trainable = Field(
        "all",
        description="`heads`: only the projection heads and the temperature train (towers frozen); `all`: everything; "
        "{image: ..., text: ...}: per tower `all`, `head` or {last_blocks: N}; or a list of stages "
        "[{until_step|until_epoch: K, trainable: ...}, ..., {trainable: ...}] switching regimes during training.",
    )
    grad_checkpointing: bool | TowerSwitch = Field(
        False,
        description="Activation checkpointing (recompute activations in backward, saving memory): true for both "
        "towers, or {image: bool, text: bool}.",
    )
    init_seed: int = Field(0, description="Seed for randomly initialised parameters (heads, from-scratch towers).")
    init_logit_bias: float | None = Field(
        None,
        description="Give the model a learnable logit bias starting at this value (the siglip loss needs one; "
        "SigLIP starts at -10). Overrides the config's init_logit_bias.",
    )
    tokenizer: str | None = Field(
        None,
        description="A byte-level BPE tokenizer.json (clipforge.models.tokenizer_bpe) for a from-scratch text "
        "transformer; the tower's vocabulary takes its size. Overrides the config's clipforge.tokenizer.",
    )
    pretrained_towers: bool = Field(
        True,
        description="Load the pretrained tower weights the config names (local files, or the model hub for configs "
        "that name hub towers); false builds the same architecture with random initialisation.",
    )

    @field_validator("name")
    @classmethod
    def _known_architecture(cls, name: str, info: ValidationInfo) -> str:
        problem = model_name_problem(name) if checking_user_spec(info) else None
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("trainable", mode="before")
    @classmethod
    def _trainable_shape(cls, value):
        # One message for a wrong scalar, instead of one per alternative of the union.
        if isinstance(value, (dict, list)) or value in ("all", "heads"):
            return value
        raise ValueError(
            f"expected `all`, `heads`, {{image: ..., text: ...}} or a list of stages, got {value!r}"
        )

    @model_validator(mode="after")
    def _stages_in_order(self) -> "ModelSpec":
        if isinstance(self.trainable, list):
            _check_stages(self.trainable)
        return self


def _check_stages(stages: list[TrainableStage]) -> None:
    if not stages:
        raise ValueError("trainable: a list of stages needs at least one stage")
    ends = [(s.until_step, s.until_epoch) for s in stages]
    if any(step is None and epoch is None for step, epoch in ends[:-1]):
        raise ValueError("trainable: every stage but the last needs until_step or until_epoch")
    kinds = {"step" if step is not None else "epoch" for step, epoch in ends if (step, epoch) != (None, None)}
    if len(kinds) > 1:
        raise ValueError("trainable: stages must all end by until_step or all by until_epoch, not a mix")
    stage_ends = [step if step is not None else epoch for step, epoch in ends]
    bounds = [end for end in stage_ends if end is not None]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"trainable: stage ends must increase, got {bounds}")


class LossSpec(Spec):
    kind: Literal["clip", "clip_tiled", "siglip"] = Field(
        "clip",
        description="`clip`: symmetric InfoNCE over the global batch; `clip_tiled`: the same loss and gradients "
        "computed in tiles, so its memory grows linearly (not quadratically) with the batch; `siglip`: pairwise "
        "sigmoid loss, text features passed around the ranks in a ring (needs a model with a logit bias).",
    )
    local_loss: bool = Field(True, description="Each rank computes its rows against all columns (OpenCLIP local loss).")
    gather_with_grad: bool = Field(True, description="All-gather features with gradient (needed for a correct loss).")
    max_logit_scale: float = Field(100.0, gt=0, description="Clamp of exp(logit_scale).")
    tile_size: int = Field(
        1024,
        ge=1,
        le=65536,
        description="`clip_tiled`: rows and columns of the logit tiles held at once (memory ~ tile_size^2 floats).",
    )
