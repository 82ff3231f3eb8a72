"""Typed spec of a training job (`kind: train`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clipforge.models.spec import LossSpec, ModelSpec
from clipforge.specbase import RayInit, Scaling, Spec


class TrainDataSpec(Spec):
    shards: list[str] = Field(..., min_length=1, description="WebDataset shards: files, folders or globs (fsspec).")
    batch_size: int = Field(256, ge=1, description="Global batch size (split evenly across workers).")
    loader_workers: int = Field(1, ge=0, description="DataLoader processes per training worker.")
    shuffle_buffer: int = Field(1000, ge=0, description="Samples held for shuffling (0: no shuffling).")
    image_key: str = Field("jpg;png;webp", description="Sample extensions tried for the image, in order.")
    text_key: str = Field("txt", description="Sample extension of the caption.")


class OptimSpec(Spec):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not applied to norms, biases, temperature).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the cosine decay.")
    epochs: int = Field(1, ge=1, description="Passes over the training shards.")
    grad_clip_norm: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")


class CheckpointSpec(Spec):
    every_epochs: int = Field(1, ge=1, description="Write a checkpoint every N epochs (and at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")


class TrainSpec(Spec):
    """`kind: train` — contrastive training on Ray Train."""

    kind: Literal["train"]
    name: str = Field("train", description="Run name.")
    storage: str = Field(..., description="Run directory (local or fsspec): checkpoints/, metrics.jsonl, spec.yaml.")
    model: ModelSpec
    data: TrainDataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    strategy: Literal["ddp"] = Field("ddp", description="Parallelism strategy.")
    cache_frozen_features: bool = Field(
        True,
        description="With `model.trainable: heads`, compute the frozen towers' outputs once and train the heads on "
        "them (no augmentation is lost: heads-only training uses the eval transform).",
    )
    resume: bool = Field(
        True,
        description="Continue from the latest complete checkpoint in STORAGE/checkpoints when there is one; "
        "`false` refuses to start in a run directory that already holds checkpoints.",
    )
    log_every_steps: int = Field(10, ge=1, description="Append a metrics line every N steps.")
    seed: int = Field(0, description="Seed for data order and initialisation.")
    scaling: Scaling = Field(default_factory=Scaling)
    ray: RayInit = Field(default_factory=RayInit)

    @model_validator(mode="after")
    def _batch_divisible(self) -> "TrainSpec":
        if self.data.batch_size % self.scaling.workers:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by scaling.workers ({self.scaling.workers})"
            )
        return self
