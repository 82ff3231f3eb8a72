"""`kind: eval` job: every model's metrics on every task, written as CLIP_benchmark-style JSON files.

One file per (dataset, model, task), named `{dataset}_{pretrained}_{model}_en_{task}.json` with
keys dataset / model / pretrained / task / metrics / language, as CLIP_benchmark names and writes them, so
`clip_benchmark build FOLDER` reads the folder; clipforge's own files there are not *.json: `results.jsonl`
(every result, one a line), the merged table `results.csv` / `results.md`, and `eval_stats.jsonl` (what was
embedded and what came from the cache, one line per model). As in CLIP_benchmark, `acc5` is written as NaN
(JSON `NaN`) for datasets with fewer than 5 classes.

Images are embedded on Ray Data, once per model for all tasks together, and only where the
embedding cache (`spec.cache`, plus memory within the job) has no features for the model's image
tower, its transform and the images. Texts are embedded in this process, cached the same way.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import posixpath
import time
from collections import defaultdict

import fsspec
import numpy as np
import torch

from clipforge.eval.cache import FeatureStore, cache_key
from clipforge.eval.embed import embed_images
from clipforge.eval.errors import EvalDataError
from clipforge.eval.fingerprint import describe_transform, digest_array
from clipforge.eval.loading import ImageSet, LoadedTask, load_task
from clipforge.eval.metrics import class_prompts, classifier_from_prompts, retrieval_metrics, zeroshot_metrics
from clipforge.eval.probe import few_shot_probe, linear_probe
from clipforge.eval.spec import RETRIEVAL_ALIASES, RETRIEVAL_TASK, EvalSpec, FewShotTask, LinearProbeTask, RetrievalTask
from clipforge.eval.tables import to_csv, to_markdown
from clipforge.eval.tower_view import TowerView, tower_view
from clipforge.models.checkpoint_files import resolve_checkpoint
from clipforge.models.spec import ModelSpec
from clipforge.runtime.output_folder import OutputOwner, claim_output_folder
from clipforge.runtime.ray_session import ray_session
from clipforge.runtime.run_dir import (
    EVAL_STATS_FILE,
    LEGACY_EVAL_STATS_FILE,
    LEGACY_RESULTS_FILE,
    RESULTS_CSV_FILE,
    RESULTS_FILE,
    RESULTS_MD_FILE,
    SPEC_FILE,
    json_lines,
    write_spec_yaml,
)
from clipforge.runtime.storage_errors import storage_errors

log = logging.getLogger(__name__)

LANGUAGE = "en"
STATS_FILE = EVAL_STATS_FILE  # what was embedded and what came from the cache, per model


def _slug(text: str) -> str:
    # CLIP_benchmark turns "wds/mscoco" into "wds_mscoco" in file names.
    return text.replace("/", "_")


def result_filename(dataset: str, model_label: str, model_name: str, task: str) -> str:
    # A model given as a JSON config path is named by the file's stem, not its whole path.
    if model_name.endswith(".json"):
        model_name = posixpath.basename(model_name.replace("\\", "/"))[: -len(".json")]
    return f"{_slug(dataset)}_{_slug(model_label)}_{_slug(model_name)}_{LANGUAGE}_{task}.json"


class _ImageFeatures:
    """Features of one ImageSet: rows of the decodable images, their positions in the set, failures."""

    def __init__(self, features: np.ndarray, kept: np.ndarray, n_items: int):
        self.features, self.kept, self.n_failed = features, kept, n_items - len(kept)


class _ModelRun:
    """One model's pass over all tasks: cached features looked up, the rest embedded, metrics computed."""

    def __init__(self, spec: EvalSpec, model_spec: ModelSpec, label: str, store: FeatureStore, start_ray):
        from clipforge.models import create_model

        self.spec, self.model_spec, self.label, self.store, self.start_ray = spec, model_spec, label, store, start_ray
        self.bundle = create_model(model_spec)
        self.view: TowerView = tower_view(self.bundle)
        self.transform = describe_transform(self.bundle.preprocess_val)
        # Counts of images and texts, and seconds spent (floats).
        self.stats: dict[str, float] = defaultdict(int)

    def _image_key(self, image_set: ImageSet) -> str:
        return cache_key(what="image", tower=self.view.image_key, transform=self.transform, images=image_set.digest)

    def image_features(self, loaded: list[LoadedTask]) -> dict[str, _ImageFeatures]:
        """Features of every task's images by cache key; one Ray Data pass embeds whatever is missing."""
        out: dict[str, _ImageFeatures] = {}
        pending: dict[str, ImageSet] = {}
        for image_set in (s for lt in loaded for s in lt.images):
            key = self._image_key(image_set)
            if key in out or key in pending:
                continue
            cached = self.store.get("image", key)
            if cached is None:
                pending[key] = image_set
                continue
            out[key] = _ImageFeatures(cached["features"], cached["kept"], int(cached["n_items"]))
            self.stats["images_from_cache"] += len(image_set.items)
        if pending:
            out.update(self._embed(pending))
        return out

    def _embed(self, pending: dict[str, ImageSet]) -> dict[str, _ImageFeatures]:
        sets = list(pending.values())
        offsets = np.cumsum([0] + [len(s.items) for s in sets])
        items = [{**it, "idx": int(off) + pos} for s, off in zip(sets, offsets) for pos, it in enumerate(s.items)]
        self.start_ray()
        t0 = time.perf_counter()
        feats, failed = embed_images(self.model_spec, items, self.spec.batch_size, self.spec.scaling,
                                     self.bundle.preprocess_val, output=self.view.kind)
        self.stats["embed_seconds"] += time.perf_counter() - t0
        self.stats["images_embedded"] += len(items)
        keep = np.ones(len(items), dtype=bool)
        keep[failed] = False
        row_start = np.concatenate([[0], np.cumsum(keep)])  # feature row of each global idx, if kept
        out = {}
        for (key, image_set), lo, hi in zip(pending.items(), offsets[:-1], offsets[1:]):
            kept = np.flatnonzero(keep[lo:hi]).astype(np.int64)
            block = feats[row_start[lo] : row_start[hi]] if len(kept) else np.zeros((0, 0), np.float32)
            self.store.put("image", key, {"features": block, "kept": kept, "n_items": np.int64(hi - lo)},
                           meta={"images": image_set.name, "model": self.model_spec.name, "n_items": int(hi - lo)})
            out[key] = _ImageFeatures(block, kept, int(hi - lo))
        return out

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised embeddings of `texts`: cached text features through this model's text head."""
        tokens = self.bundle.tokenizer(list(texts))
        key = cache_key(what="text", tower=self.view.text_key, tokens=digest_array(tokens))
        cached = self.store.get("text", key)
        if cached is not None:
            feats = torch.from_numpy(cached["features"])
            self.stats["texts_from_cache"] += len(texts)
        else:
            t0 = time.perf_counter()
            feats = self.view.text_features(tokens)
            self.stats["text_seconds"] += time.perf_counter() - t0
            self.stats["texts_embedded"] += len(texts)
            self.store.put("text", key, {"features": feats.numpy()}, meta={"texts": len(texts)})
        return self.view.project_texts(feats)

    def embedded(self, lt: LoadedTask, image_set: ImageSet,
                 features: dict[str, _ImageFeatures]) -> tuple[torch.Tensor, _ImageFeatures]:
        got = features[self._image_key(image_set)]
        if len(got.kept) == 0:
            raise EvalDataError(f"task {lt.task.dataset!r}: none of the {len(image_set.items)} images of "
                                f"{image_set.name} could be decoded")
        return self.view.project_images(got.features), got


def _retrieval(run: _ModelRun, lt: LoadedTask, task: RetrievalTask, features) -> dict:
    image_emb, got = run.embedded(lt, lt.images[0], features)
    # Captions of a skipped image have nothing to retrieve: they leave with it.
    row_of_image = np.full(len(lt.images[0].items), -1, dtype=np.int64)
    row_of_image[got.kept] = np.arange(len(got.kept))
    caption_rows = row_of_image[np.asarray(lt.caption_image, dtype=np.int64)]
    keep_caption = torch.from_numpy(caption_rows >= 0)
    text_emb = run.text_embeddings(lt.captions)[keep_caption]
    metrics = retrieval_metrics(image_emb, text_emb, torch.from_numpy(caption_rows)[keep_caption],
                                ks=task.recall_k)
    metrics.update(n_images=len(got.kept), n_texts=len(text_emb), n_failed=got.n_failed)
    return metrics


def _zeroshot(run: _ModelRun, lt: LoadedTask, features) -> dict:
    image_emb, got = run.embedded(lt, lt.images[0], features)
    per_class = class_prompts(lt.classnames, lt.templates)
    classifier = classifier_from_prompts(run.text_embeddings([p for ps in per_class for p in ps]), per_class)
    labels = torch.as_tensor(lt.images[0].labels)[torch.from_numpy(got.kept)]
    metrics = zeroshot_metrics(100.0 * image_emb @ classifier, labels)
    metrics.update(n_images=len(got.kept), n_classes=len(lt.classnames), n_failed=got.n_failed)
    return metrics


def _probe(run: _ModelRun, lt: LoadedTask, task: LinearProbeTask | FewShotTask, features) -> dict:
    (x_train, train), (x_test, test) = (run.embedded(lt, s, features) for s in lt.images)
    y_train = torch.as_tensor(lt.images[0].labels)[torch.from_numpy(train.kept)]
    y_test = torch.as_tensor(lt.images[1].labels)[torch.from_numpy(test.kept)]
    try:
        if isinstance(task, LinearProbeTask):
            metrics = linear_probe(x_train, y_train, x_test, y_test, lt.n_classes, task.weight_decays,
                                   val_fraction=task.val_fraction, seed=task.seed, max_iter=task.max_iter)
        else:
            metrics = few_shot_probe(x_train, y_train, x_test, y_test, lt.n_classes, task.shots,
                                     task.weight_decays, val_shots=task.val_shots, repeats=task.repeats,
                                     seed=task.seed, max_iter=task.max_iter)
            metrics["n_train_pool"] = len(y_train)
    except ValueError as e:
        raise EvalDataError(f"task {task.dataset!r} ({task.task}): {e}") from None
    metrics.update(n_classes=lt.n_classes, n_failed=train.n_failed + test.n_failed)
    return metrics


def _score(run: _ModelRun, lt: LoadedTask, features) -> dict:
    with torch.no_grad():
        if isinstance(lt.task, RetrievalTask):
            return _retrieval(run, lt, lt.task, features)
        if isinstance(lt.task, (LinearProbeTask, FewShotTask)):
            return _probe(run, lt, lt.task, features)
        return _zeroshot(run, lt, features)


def _write_text(fs, path: str, text: str) -> None:
    with fs.open(path, "w") as f:
        f.write(text)


def _write_json(fs, path: str, data) -> None:
    _write_text(fs, path, json.dumps(data, indent=2))


def _shown(metrics: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in metrics.items()}


def output_owner(spec: EvalSpec) -> OutputOwner:
    """This job as the owner of its storage folder: result JSON files, merged tables and stats (under their names
    of today and of before)."""
    return OutputOwner("eval", spec.name, "storage",
                       own_names=("*.json", RESULTS_FILE, RESULTS_CSV_FILE, RESULTS_MD_FILE, EVAL_STATS_FILE,
                                  SPEC_FILE),
                       signature=(RESULTS_FILE, LEGACY_RESULTS_FILE))


def _remove_stale(fs, root: str, results: list[dict]) -> None:
    """Drop what an earlier version of this job left in its folder under other names (its summaries as *.json,
    retrieval results under the task's old name): `clip_benchmark build` would read them as results."""
    stale = [LEGACY_RESULTS_FILE, LEGACY_EVAL_STATS_FILE]
    stale += [result_filename(r["dataset"], r["pretrained"], r["model"], old)
              for r in results if r["task"] == RETRIEVAL_TASK for old in RETRIEVAL_ALIASES]
    for name in stale:
        path = posixpath.join(root, name)
        if fs.exists(path):
            fs.rm(path)


def _checkpoint_fields(spec: EvalSpec) -> list[tuple[str, str]]:
    """(spec field, checkpoint) of every model that loads a checkpoint, to check them before any work."""
    if spec.model is not None:
        return [("model.checkpoint", spec.model.checkpoint)] if spec.model.checkpoint else []
    assert spec.models is not None  # EvalSpec gives exactly one of `model` and `models`
    return [(f"models.{i}.checkpoint", m.checkpoint) for i, m in enumerate(spec.models) if m.checkpoint]


def task_source(task) -> str:
    """The path a task reads, for messages."""
    if isinstance(task, RetrievalTask):
        if task.shards is not None:
            return ", ".join(task.shards)
        assert task.table is not None  # a retrieval task reads `shards` or a `table`
        return task.table
    if isinstance(task, (LinearProbeTask, FewShotTask)):
        return task.train.path if task.train.kind == "image_folder" else task.train.images
    source = task.labelled_source()
    return source.path if source.kind == "image_folder" else source.images


def run_eval(spec: EvalSpec) -> list[dict]:
    """Run every task of `spec` for every model; write the result files into `spec.storage`; return the results."""
    # Read and check every task's data first: a bad folder fails the job before any model work.
    loaded = []
    for i, task in enumerate(spec.tasks):
        with storage_errors(f"tasks.{i}", task_source(task)):
            loaded.append(load_task(task))
    for field, checkpoint in _checkpoint_fields(spec):
        with storage_errors(field, checkpoint):
            resolve_checkpoint(checkpoint)
    claim_output_folder(spec.storage, output_owner(spec), overwrite=spec.overwrite)
    with storage_errors("storage", spec.storage):
        write_spec_yaml(spec.storage, spec)  # what the dashboard's eval page shows
    with storage_errors("cache", spec.cache or ""):
        store = FeatureStore(spec.cache)
    fs, root = fsspec.core.url_to_fs(spec.storage)
    results: list[dict] = []
    stats: list[dict] = []
    with contextlib.ExitStack() as stack:
        ray_started: list[bool] = []

        def start_ray() -> None:
            # Ray only when something must be embedded: a job served from the cache never starts it.
            if not ray_started:
                stack.enter_context(ray_session(spec.ray))
                ray_started.append(True)

        for model_spec, label in spec.model_entries():
            t0 = time.perf_counter()
            run = _ModelRun(spec, model_spec, label, store, start_ray)
            features = run.image_features(loaded)
            for lt in loaded:
                metrics = _score(run, lt, features)
                result = {"dataset": lt.task.dataset, "model": model_spec.name, "pretrained": label,
                          "task": lt.task.task, "metrics": metrics, "language": LANGUAGE}
                _write_json(fs, posixpath.join(root, result_filename(lt.task.dataset, label, model_spec.name,
                                                                     lt.task.task)), result)
                log.info("%s %s %s: %s", label, lt.task.dataset, lt.task.task, _shown(metrics))
                results.append(result)
            entry = {"model": model_spec.name, "pretrained": label, "feature_kind": run.view.kind,
                     **{k: 0 for k in ("images_embedded", "images_from_cache", "texts_embedded", "texts_from_cache")},
                     **{k: round(v, 3) if isinstance(v, float) else v for k, v in run.stats.items()},
                     "seconds": round(time.perf_counter() - t0, 3)}
            log.info("eval %s (%s): %d images embedded, %d from cache; %d texts embedded, %d from cache; %.1f s",
                     label, model_spec.name, entry["images_embedded"], entry["images_from_cache"],
                     entry["texts_embedded"], entry["texts_from_cache"], entry["seconds"])
            stats.append(entry)
    _remove_stale(fs, root, results)
    _write_text(fs, posixpath.join(root, RESULTS_CSV_FILE), to_csv(results))
    _write_text(fs, posixpath.join(root, RESULTS_MD_FILE), to_markdown(results))
    _write_text(fs, posixpath.join(root, STATS_FILE), json_lines([{"cache": spec.cache, **s} for s in stats]))
    # Last: its presence marks the job finished.
    _write_text(fs, posixpath.join(root, RESULTS_FILE), json_lines(results))
    return results
