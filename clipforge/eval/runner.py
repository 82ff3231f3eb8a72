"""`kind: eval` job: every task's metrics, written as CLIP_benchmark-style JSON files.

One file per (dataset, model, task), named `{dataset}_{pretrained}_{model}_en_{task}.json` with
keys dataset / model / pretrained / task / metrics / language, plus `results.json` (all of them).
As in CLIP_benchmark, `acc5` is written as NaN (JSON `NaN`) for datasets with fewer than 5 classes.
"""
from __future__ import annotations

import json
import logging
import math
import posixpath
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch

from clipforge.cluster.ray_runtime import ray_session
from clipforge.eval.datasets import load_image_folder, load_retrieval_webdataset
from clipforge.eval.embed import embed_images, embed_texts
from clipforge.eval.metrics import retrieval_metrics, zeroshot_classifier, zeroshot_metrics
from clipforge.eval.spec import EvalSpec, RetrievalTask, ZeroShotTask
from clipforge.eval.templates import get_templates

log = logging.getLogger(__name__)

LANGUAGE = "en"


def _slug(text: str) -> str:
    # CLIP_benchmark turns "wds/mscoco" into "wds_mscoco" in file names.
    return text.replace("/", "_")


def result_filename(dataset: str, model_label: str, model_name: str, task: str) -> str:
    # A model given as a JSON config path is named by the file's stem, not its whole path.
    if model_name.endswith(".json"):
        model_name = posixpath.basename(model_name.replace("\\", "/"))[: -len(".json")]
    return f"{_slug(dataset)}_{_slug(model_label)}_{_slug(model_name)}_{LANGUAGE}_{task}.json"


@dataclass
class _LoadedTask:
    """A task with its data read and checked, before any embedding."""

    task: RetrievalTask | ZeroShotTask
    items: list[dict]
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)
    templates: list[str] | dict[str, list[str]] = field(default_factory=list)


def _load_task(task: RetrievalTask | ZeroShotTask) -> _LoadedTask:
    if isinstance(task, RetrievalTask):
        items, captions, caption_image = load_retrieval_webdataset(task.shards)
        return _LoadedTask(task, items, captions=captions, caption_image=caption_image)
    items, labels, folder_names = load_image_folder(task.image_folder)
    classnames = task.classnames or folder_names
    if len(classnames) != len(folder_names):
        raise ValueError(
            f"task {task.dataset!r}: {len(classnames)} classnames given but {task.image_folder} has "
            f"{len(folder_names)} class folders ({', '.join(folder_names)})"
        )
    templates = get_templates(task.templates)
    return _LoadedTask(task, items, labels=labels, classnames=classnames, templates=templates)


def _embed_all(spec: EvalSpec, loaded: list[_LoadedTask], bundle) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Every task's images in one Ray Data pass (one actor pool start-up for the whole job).

    Returns per task: embeddings of its decodable images, their positions in the task's items, n_failed.
    """
    offsets = np.cumsum([0] + [len(lt.items) for lt in loaded])
    items = [{**it, "idx": int(off) + it["idx"]} for lt, off in zip(loaded, offsets) for it in lt.items]
    image_emb, failed = embed_images(spec.model, items, spec.batch_size, spec.scaling, bundle.preprocess_val)
    keep = np.ones(len(items), dtype=bool)
    keep[failed] = False
    row_start = np.concatenate([[0], np.cumsum(keep)])  # embedding row of each global idx, if kept
    out = []
    for lt, lo, hi in zip(loaded, offsets[:-1], offsets[1:]):
        kept = np.flatnonzero(keep[lo:hi])
        if len(kept) == 0:
            raise ValueError(f"task {lt.task.dataset!r}: none of its {hi - lo} images could be decoded")
        out.append((image_emb[row_start[lo] : row_start[hi]], kept, int(hi - lo - len(kept))))
    return out


def _retrieval(lt: _LoadedTask, image_emb: np.ndarray, kept: np.ndarray, n_failed: int, bundle) -> dict:
    # Captions of a skipped image have nothing to retrieve: they leave with it.
    row_of_image = np.full(len(lt.items), -1, dtype=np.int64)
    row_of_image[kept] = np.arange(len(kept))
    caption_rows = row_of_image[np.asarray(lt.caption_image, dtype=np.int64)]
    keep_caption = caption_rows >= 0
    texts = [c for c, keep in zip(lt.captions, keep_caption) if keep]
    text_emb = embed_texts(bundle, texts)
    metrics = retrieval_metrics(
        torch.from_numpy(image_emb), text_emb, torch.from_numpy(caption_rows[keep_caption]), ks=lt.task.recall_k
    )
    metrics.update(n_images=len(kept), n_texts=len(texts), n_failed=n_failed)
    return metrics


def _zeroshot(lt: _LoadedTask, image_emb: np.ndarray, kept: np.ndarray, n_failed: int, bundle) -> dict:
    classifier = zeroshot_classifier(bundle.model, bundle.tokenizer, lt.classnames, lt.templates)
    logits = 100.0 * torch.from_numpy(image_emb) @ classifier
    metrics = zeroshot_metrics(logits, torch.as_tensor(lt.labels)[torch.from_numpy(kept)])
    metrics.update(n_images=len(kept), n_classes=len(lt.classnames), n_failed=n_failed)
    return metrics


def _write_json(fs, path: str, data) -> None:
    with fs.open(path, "w") as f:
        json.dump(data, f, indent=2)


def run_eval(spec: EvalSpec) -> list[dict]:
    """Run every task of `spec`; write one result JSON per task and `results.json` into `spec.storage`."""
    from clipforge.models import create_model

    # Read and check every task's data first: a bad folder fails the job before any model work.
    loaded = [_load_task(task) for task in spec.tasks]
    with ray_session(spec.ray):
        bundle = create_model(spec.model)
        bundle.model.eval()
        embedded = _embed_all(spec, loaded, bundle)
    fs, root = fsspec.core.url_to_fs(spec.storage)
    fs.makedirs(root, exist_ok=True)
    results: list[dict] = []
    for lt, (image_emb, kept, n_failed) in zip(loaded, embedded):
        task = lt.task
        with torch.no_grad():
            if isinstance(task, RetrievalTask):
                metrics = _retrieval(lt, image_emb, kept, n_failed, bundle)
            else:
                metrics = _zeroshot(lt, image_emb, kept, n_failed, bundle)
        result = {
            "dataset": task.dataset,
            "model": spec.model.name,
            "pretrained": spec.model_label,
            "task": task.task,
            "metrics": metrics,
            "language": LANGUAGE,
        }
        name = result_filename(task.dataset, spec.model_label, spec.model.name, task.task)
        _write_json(fs, posixpath.join(root, name), result)
        shown = {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in metrics.items()}
        log.info("%s %s: %s", task.dataset, task.task, shown)
        results.append(result)
    _write_json(fs, posixpath.join(root, "results.json"), results)
    return results
