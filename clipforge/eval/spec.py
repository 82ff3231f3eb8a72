"""Typed spec of an evaluation job (`kind: eval`)."""
from __future__ import annotations

import os
import posixpath
from typing import Annotated, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from clipforge.eval.templates import templates_problem
from clipforge.models.spec import ModelSpec
from clipforge.runtime.run_dir import EVAL_TASK_ALIASES, eval_task_name
from clipforge.specbase import OutputFolder, RayInit, Scaling, Spec, checking_user_spec


class ImageFolderSource(Spec):
    """Labelled images as `path/<class>/**/<image>`; classes in sorted folder-name order."""

    kind: Literal["image_folder"] = Field(..., description="`image_folder` (may be left out where `path` is given).")
    path: str = Field(..., description="Folder with one sub-folder of images per class (local or fsspec).")
    max_per_class: int | None = Field(
        None, ge=1, description="Keep the first N images of each class (sorted file order); default all."
    )


class IdxSource(Spec):
    """Labelled images in IDX files (the MNIST / Fashion-MNIST format, optionally gzipped)."""

    kind: Literal["idx"] = Field(..., description="`idx` (may be left out where `images` is given).")
    images: str = Field(..., description="IDX image file (`*-images-idx3-ubyte[.gz]`), local or fsspec.")
    labels: str = Field(..., description="IDX label file (`*-labels-idx1-ubyte[.gz]`) with one label per image.")
    max_per_class: int | None = Field(
        None, ge=1, description="Keep the first N images of each class (file order); default all."
    )


ImageSource = Annotated[Union[ImageFolderSource, IdxSource], Field(discriminator="kind")]


def infer_source_kind(value):
    """`kind` of an image source may be left out where the fields say it: `path` is an image folder, `images`
    IDX files."""
    if isinstance(value, dict) and "kind" not in value:
        if "images" in value:
            return {"kind": "idx", **value}
        if "path" in value:
            return {"kind": "image_folder", **value}
    return value


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _source_absolute(source: "ImageFolderSource | IdxSource") -> "ImageFolderSource | IdxSource":
    if isinstance(source, IdxSource):
        return source.model_copy(update={"images": _absolute(source.images), "labels": _absolute(source.labels)})
    return source.model_copy(update={"path": _absolute(source.path)})


# The column names OpenCLIP's csv training data uses (--csv-img-key / --csv-caption-key defaults).
DEFAULT_IMAGE_COLUMN = "filepath"
DEFAULT_CAPTION_COLUMN = "title"


# CLIP_benchmark's name of the image-text retrieval task: results and result file names carry it.
RETRIEVAL_TASK = "zeroshot_retrieval"
# clipforge's earlier names of it (run_dir's table of old task names), still accepted in specs.
RETRIEVAL_ALIASES = tuple(old for old, new in EVAL_TASK_ALIASES.items() if new == RETRIEVAL_TASK)


class RetrievalTask(Spec):
    # RETRIEVAL_TASK and RETRIEVAL_ALIASES spelled out: a Literal takes values, not names.
    task: Literal["zeroshot_retrieval", "retrieval"] = Field(
        ..., description="`zeroshot_retrieval` (CLIP_benchmark's name); `retrieval` is accepted as the same task."
    )
    dataset: str = Field(..., description="Dataset name used in results.")
    shards: list[str] | None = Field(
        None, min_length=1, description="WebDataset shards (files, folders, globs): an image and a .txt whose "
        "non-empty lines are that image's captions. Give this or `table`."
    )
    table: str | None = Field(
        None, min_length=1, description="A csv, tsv, parquet or jsonl table (local or fsspec; .gz etc. allowed for "
        "text) with an image path and a caption per row: rows naming the same image give it several captions, and a "
        "caption cell may hold a list (`[\"a dog\", \"a brown dog\"]`). Relative image paths are relative to the "
        "table's folder. Give this or `shards`."
    )
    image_column: str = Field(DEFAULT_IMAGE_COLUMN, min_length=1, description="`table`'s image path column.")
    caption_column: str = Field(DEFAULT_CAPTION_COLUMN, min_length=1, description="`table`'s caption column.")
    table_format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = Field(
        "auto", description="Format of `table`; `auto` tells it from the file extension."
    )
    recall_k: list[int] = Field(
        default_factory=lambda: [1, 5, 10], min_length=1, description="K values for Recall@K."
    )

    @field_validator("task")
    @classmethod
    def _canonical_name(cls, task: str) -> str:
        # One name in results, file names and dumped specs, whichever name the spec used.
        return eval_task_name(task)

    @field_validator("recall_k")
    @classmethod
    def _positive_distinct_k(cls, ks: list[int]) -> list[int]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every k must be >= 1, got {ks}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"k values must be distinct, got {ks}")
        return ks

    @model_validator(mode="after")
    def _one_source(self) -> "RetrievalTask":
        if (self.shards is None) == (self.table is None):
            raise ValueError("give exactly one of `shards` (WebDataset shards) and `table` (a csv/tsv/parquet/jsonl "
                             f"table of image path + caption), not {'neither' if self.shards is None else 'both'}")
        if self.shards is not None:
            # Compared with the defaults, not with the fields set: a dumped spec (sent to workers) sets them all.
            table_only = sorted(f for f in ("image_column", "caption_column", "table_format")
                                if getattr(self, f) != type(self).model_fields[f].default)
            if table_only:
                verb = "applies" if len(table_only) == 1 else "apply"
                raise ValueError(f"{', '.join(table_only)} {verb} to `table` only, not to `shards`")
        return self

    def with_absolute_paths(self) -> "RetrievalTask":
        """The task with local paths made absolute (for processes that run in another directory)."""
        if self.shards is not None:
            return self.model_copy(update={"shards": [_absolute(s) for s in self.shards]})
        assert self.table is not None  # _one_source: `shards` or a `table`
        return self.model_copy(update={"table": _absolute(self.table)})


class ZeroShotTask(Spec):
    task: Literal["zeroshot_classification"]
    dataset: str = Field(..., description="Dataset name used in results.")
    image_folder: str | None = Field(
        None, description="Folder with one sub-folder of images per class (sorted = class index). Give this or "
        "`source`."
    )
    source: ImageSource | None = Field(
        None, description="Labelled images as the probes take them: an image folder (`path`) or IDX files "
        "(`images`, `labels`), with optional `max_per_class`. Give this or `image_folder`."
    )
    classnames: list[str] | None = Field(
        None, min_length=1,
        description="Class names used in prompts, in sorted sub-folder order (default: the folder names); "
        "required for IDX files, in label order."
    )
    templates: list[str] | str = Field(
        "openai_imagenet",
        description="Prompt templates with `{c}`, or the name of a built-in template set.",
    )

    @field_validator("source", mode="before")
    @classmethod
    def _infer_source_kind(cls, value):
        return infer_source_kind(value)

    @field_validator("templates")
    @classmethod
    def _usable_templates(cls, value: list[str] | str, info: ValidationInfo) -> list[str] | str:
        problem = templates_problem(value, read_files=checking_user_spec(info))
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ZeroShotTask":
        if (self.image_folder is None) == (self.source is None):
            raise ValueError("give exactly one of `image_folder` and `source` (an image folder or IDX files), not "
                             f"{'neither' if self.source is None else 'both'}")
        if isinstance(self.source, IdxSource) and not self.classnames:
            raise ValueError("IDX files carry no class names: give `classnames`, one per label (label 0 first)")
        return self

    def labelled_source(self) -> ImageFolderSource | IdxSource:
        """The task's images as a source, whichever of `image_folder` and `source` names them."""
        if self.source is not None:
            return self.source
        assert self.image_folder is not None  # _one_source: `image_folder` or a `source`
        return ImageFolderSource(kind="image_folder", path=self.image_folder)

    def with_absolute_paths(self) -> "ZeroShotTask":
        """The task with local paths made absolute (for processes that run in another directory)."""
        if self.source is not None:
            return self.model_copy(update={"source": _source_absolute(self.source)})
        assert self.image_folder is not None  # _one_source: `image_folder` or a `source`
        return self.model_copy(update={"image_folder": _absolute(self.image_folder)})


# Tasks that need only embeddings and the eval metrics: the training loop's periodic evaluation runs these too.
EvalTask = Annotated[Union[RetrievalTask, ZeroShotTask], Field(discriminator="task")]


def _default_weight_decays() -> list[float]:
    # Half-decade steps from 1e-6 to 10: a log-spaced sweep over the L2 strength of the probe.
    return [10.0 ** (e / 2) for e in range(-12, 3)]


class _ProbeTask(Spec):
    dataset: str = Field(..., description="Dataset name used in results.")
    train: ImageSource = Field(..., description="Labelled images the probe is fitted on (validation is carved from "
                               "them).")
    test: ImageSource = Field(..., description="Labelled images the probe is scored on.")
    weight_decays: list[float] = Field(
        default_factory=_default_weight_decays, min_length=1,
        description="L2 strengths swept on the validation split (loss = mean cross-entropy + wd/2 * |W|^2; "
        "sklearn's C = 1 / (wd * n_train)).",
    )
    max_iter: int = Field(1000, ge=1, le=1_000_000, description="L-BFGS iterations per fit.")
    seed: int = Field(0, description="Seed of the validation split (and of the few-shot samples).")

    @field_validator("train", "test", mode="before")
    @classmethod
    def _infer_source_kind(cls, value):
        return infer_source_kind(value)

    @field_validator("weight_decays")
    @classmethod
    def _positive(cls, wds: list[float]) -> list[float]:
        if any(not (w > 0) for w in wds):
            raise ValueError(f"weight decays must be > 0, got {wds}")
        return sorted(set(wds))


class LinearProbeTask(_ProbeTask):
    """Logistic regression on frozen image embeddings (the CLIP paper's linear-probe protocol)."""

    task: Literal["linear_probe"]
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each class's train images held out to choose the weight decay; "
        "the probe is then refitted on all train images."
    )


class FewShotTask(_ProbeTask):
    """Linear probes fitted on k labelled images per class, for each k in `shots`."""

    task: Literal["few_shot"]
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1,
                             description="Images per class the probe is fitted on.")
    val_shots: int = Field(
        4, ge=1, description="Validation images per class for choosing the weight decay: min(k, val_shots) others "
        "from the same class, never among the k."
    )
    repeats: int = Field(1, ge=1, le=1000,
                         description="Draws of the k-shot sample (seeds seed, seed+1, ...); metrics are "
                         "averaged over them.")

    @field_validator("shots")
    @classmethod
    def _positive_distinct_shots(cls, shots: list[int]) -> list[int]:
        if any(k < 1 for k in shots) or len(set(shots)) != len(shots):
            raise ValueError(f"shots must be distinct and >= 1, got {shots}")
        return sorted(shots)


JobTask = Annotated[
    Union[RetrievalTask, ZeroShotTask, LinearProbeTask, FewShotTask], Field(discriminator="task")
]


class SuiteModel(ModelSpec):
    """One model of a suite: a model spec plus the label its results carry (`pretrained` in the files)."""

    label: str = Field(..., min_length=1, description="Written as `pretrained` in results (e.g. `untrained`).")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(**self.model_dump(exclude={"label"}))


def _name_stem(name: str) -> str:
    # A model given as a JSON config path is named by the file's stem, not its whole path.
    if name.endswith(".json"):
        return posixpath.basename(name.replace("\\", "/"))[: -len(".json")]
    return name


class EvalSpec(Spec):
    """`kind: eval` — retrieval, zero-shot classification and linear probes of one or several models on Ray Data."""

    kind: Literal["eval"]
    name: str = Field("eval", description="Job name.")
    storage: OutputFolder = Field(
        ..., description="Output folder for result JSON files and tables (local or fsspec)."
    )
    overwrite: bool = Field(
        False, description="Write into `storage` even if it holds files of something else (another job, or not "
        "clipforge at all): files of the same names are replaced, others are left alone. Without it the folder must "
        "be empty, missing, or this job's own earlier output.",
    )
    model: ModelSpec | None = Field(None, description="The model to evaluate (or give `models`).")
    model_label: str = Field("clipforge", description="Written as `pretrained` in CLIP_benchmark-style results.")
    models: list[SuiteModel] | None = Field(
        None, min_length=1, description="Several models, each {name, checkpoint, label, ...}, evaluated on every "
        "task (instead of `model`)."
    )
    tasks: list[JobTask] = Field(..., min_length=1)
    batch_size: int = Field(64, ge=1, le=65536, description="Images per embedding batch.")
    cache: OutputFolder | None = Field(
        None,
        description="Folder (local or fsspec) of cached tower features, reused by later jobs: a model whose "
        "frozen towers match (e.g. after heads-only training) skips embedding. None: no cache across jobs.",
    )
    scaling: Scaling = Field(default_factory=lambda: Scaling(workers=2, cpus_per_worker=0.5))
    ray: RayInit = Field(default_factory=RayInit)

    @model_validator(mode="after")
    def _one_model_form(self) -> "EvalSpec":
        if (self.model is None) == (self.models is None):
            raise ValueError("give either `model` (one model) or `models` (a list), not both or neither")
        return self

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
        if self.models is not None:
            names: dict[tuple[str, str], int] = {}
            for i, m in enumerate(self.models):
                files_key = (m.label.replace("/", "_"), _name_stem(m.name).replace("/", "_"))
                if files_key in names:
                    raise ValueError(
                        f"models #{names[files_key]} and #{i} are both {m.name!r} labelled {m.label!r}; their "
                        "results would share file names: give them different labels"
                    )
                names[files_key] = i
        return self

    def model_entries(self) -> list[tuple[ModelSpec, str]]:
        """(model spec, label) of every model the job evaluates, in the given order."""
        if self.models is not None:
            return [(m.model_spec(), m.label) for m in self.models]
        assert self.model is not None  # _one_model_form: `model` or `models`
        return [(self.model, self.model_label)]
