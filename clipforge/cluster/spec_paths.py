"""Every path a job spec names, with its field: what a job reads (inputs) and where it writes (outputs).

`clipforge run --dry-run` checks these before anything starts, and `clipforge render kuberay` warns about
the local ones (pods on other machines cannot see this machine's files). Fields are named as overrides name
them (`data.shards.0`, `tasks.1.train.path`), so an error says exactly what to change.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from clipforge.eval.spec import IdxSource, RetrievalTask, ZeroShotTask

# What an input must be: a file, a folder, either (`any`: a checkpoint is a folder or a state-dict file),
# WebDataset shards (a file, a folder of *.tar or a glob) or a build's URL list (a file, a folder or a glob).
Shape = Literal["file", "folder", "any", "shards", "url_list"]


@dataclasses.dataclass(frozen=True)
class SpecPath:
    """One path of a spec: the field naming it, the path as written, and what the job does with it."""

    field: str
    path: str
    role: Literal["input", "output"]
    shape: Shape = "any"
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


def is_local(path: str) -> bool:
    """A path on this machine's own disk (plain or file://), as opposed to an object store or URL."""
    return "://" not in path or path.startswith("file://")


def resolved(path: str) -> str:
    """Local paths absolute (jobs read them relative to the folder they start in), URLs as written."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _model_paths(prefix: str, model) -> list[SpecPath]:
    paths = []
    # A model named by a JSON config file rather than by an architecture name (models.registry's rule).
    if model.name.endswith(".json") or "/" in model.name or "\\" in model.name:
        paths.append(SpecPath(f"{prefix}.name", model.name, "input", "file"))
    if model.checkpoint:
        paths.append(SpecPath(f"{prefix}.checkpoint", model.checkpoint, "input", "any"))
    if model.tokenizer:
        paths.append(SpecPath(f"{prefix}.tokenizer", model.tokenizer, "input", "file"))
    return paths


def _image_source_paths(prefix: str, source) -> list[SpecPath]:
    if isinstance(source, IdxSource):
        return [SpecPath(f"{prefix}.images", source.images, "input", "file"),
                SpecPath(f"{prefix}.labels", source.labels, "input", "file")]
    return [SpecPath(f"{prefix}.path", source.path, "input", "folder")]


def _templates_paths(prefix: str, templates) -> list[SpecPath]:
    if isinstance(templates, str) and templates.endswith(".json"):
        return [SpecPath(f"{prefix}.templates", templates, "input", "file")]
    return []


def _task_paths(prefix: str, task) -> list[SpecPath]:
    """The inputs of one evaluation task (retrieval, zero-shot, linear probe or few-shot)."""
    if isinstance(task, RetrievalTask):
        if task.shards is not None:
            return [SpecPath(f"{prefix}.shards.{i}", s, "input", "shards") for i, s in enumerate(task.shards)]
        assert task.table is not None  # RetrievalTask._one_source: `shards` or a `table`
        return [SpecPath(f"{prefix}.table", task.table, "input", "file")]
    if isinstance(task, ZeroShotTask):
        if task.image_folder is not None:
            paths = [SpecPath(f"{prefix}.image_folder", task.image_folder, "input", "folder")]
        else:
            paths = _image_source_paths(f"{prefix}.source", task.labelled_source())
        return paths + _templates_paths(prefix, task.templates)
    return _image_source_paths(f"{prefix}.train", task.train) + _image_source_paths(f"{prefix}.test", task.test)


def _build_paths(spec) -> list[SpecPath]:
    paths = [SpecPath("input.path", spec.input.path, "input", "url_list", spec.input.storage_options)]
    clip_score = spec.filters.clip_score
    if clip_score is not None:
        paths += _model_paths("filters.clip_score.model", clip_score.model)
    return paths + [SpecPath("output.path", spec.output.path, "output", "folder", spec.output.storage_options)]


def _train_paths(spec) -> list[SpecPath]:
    data = spec.data
    if data.sources is None:
        paths = [SpecPath(f"data.shards.{i}", s, "input", "shards") for i, s in enumerate(data.shards)]
    else:
        paths = [SpecPath(f"data.sources.{i}.shards.{j}", s, "input", "shards")
                 for i, source in enumerate(data.sources) for j, s in enumerate(source.shards)]
    paths += _model_paths("model", spec.model)
    for i, task in enumerate(spec.eval_tasks):
        paths += _task_paths(f"eval_tasks.{i}", task)
    return paths + [SpecPath("storage", spec.storage, "output", "folder")]


def _eval_paths(spec) -> list[SpecPath]:
    paths = []
    if spec.models is not None:
        for i, model in enumerate(spec.models):
            paths += _model_paths(f"models.{i}", model)
    else:
        paths += _model_paths("model", spec.model)
    for i, task in enumerate(spec.tasks):
        paths += _task_paths(f"tasks.{i}", task)
    paths.append(SpecPath("storage", spec.storage, "output", "folder"))
    if spec.cache is not None:
        paths.append(SpecPath("cache", spec.cache, "output", "folder"))
    return paths


def spec_paths(spec) -> list[SpecPath]:
    """Every path of a build, train or eval spec, inputs first, in the order the spec lists them."""
    by_kind = {"build": _build_paths, "train": _train_paths, "eval": _eval_paths}
    if spec.kind not in by_kind:
        raise ValueError(f"spec_paths: not a single job: kind {spec.kind!r}")  # a sweep lists its children's
    return by_kind[spec.kind](spec)
