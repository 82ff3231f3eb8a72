"""Typed spec of an evaluation job (`kind: eval`)."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from clipforge.models.spec import ModelSpec
from clipforge.specbase import RayInit, Scaling, Spec


class RetrievalTask(Spec):
    task: Literal["retrieval"]
    dataset: str = Field(..., description="Dataset name used in results.")
    shards: list[str] = Field(
        ..., min_length=1, description="WebDataset shards (files, folders, globs): an image and a .txt whose "
        "non-empty lines are that image's captions."
    )
    recall_k: list[int] = Field(
        default_factory=lambda: [1, 5, 10], min_length=1, description="K values for Recall@K."
    )

    @field_validator("recall_k")
    @classmethod
    def _positive_distinct_k(cls, ks: list[int]) -> list[int]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every k must be >= 1, got {ks}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"k values must be distinct, got {ks}")
        return ks


class ZeroShotTask(Spec):
    task: Literal["zeroshot_classification"]
    dataset: str = Field(..., description="Dataset name used in results.")
    image_folder: str = Field(..., description="Folder with one sub-folder of images per class (sorted = class index).")
    classnames: list[str] | None = Field(
        None, description="Class names used in prompts, in sorted sub-folder order (default: the folder names)."
    )
    templates: list[str] | str = Field(
        "openai_imagenet",
        description="Prompt templates with `{c}`, or the name of a built-in template set.",
    )


EvalTask = Annotated[Union[RetrievalTask, ZeroShotTask], Field(discriminator="task")]


class EvalSpec(Spec):
    """`kind: eval` — retrieval and zero-shot classification on Ray Data."""

    kind: Literal["eval"]
    name: str = Field("eval", description="Job name.")
    storage: str = Field(..., description="Output folder for result JSON files (local or fsspec).")
    model: ModelSpec
    model_label: str = Field("clipforge", description="Written as `pretrained` in CLIP_benchmark-style results.")
    tasks: list[EvalTask] = Field(..., min_length=1)
    batch_size: int = Field(64, ge=1, description="Images per embedding batch.")
    scaling: Scaling = Field(default_factory=lambda: Scaling(workers=2, cpus_per_worker=0.5))
    ray: RayInit = Field(default_factory=RayInit)

    @model_validator(mode="after")
    def _distinct_outputs(self) -> "EvalSpec":
        # Each (dataset, task) pair names one result file; a repeat would silently overwrite the first.
        seen: dict[tuple[str, str], int] = {}
        for i, t in enumerate(self.tasks):
            key = (t.dataset.replace("/", "_"), t.task)
            if key in seen:
                raise ValueError(
                    f"tasks #{seen[key]} and #{i} both run {t.task} on dataset {t.dataset!r}; "
                    "give them different `dataset` names"
                )
            seen[key] = i
        return self
