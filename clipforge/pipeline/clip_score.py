"""CLIP-score filter: image-caption similarity of every kept sample, on Ray Data, then a keep rule.

Stage 1 (tasks, a quarter CPU each): read one shard's tar and emit the samples still to be scored.
Stage 2 (a fixed pool of actors, each building the model once): preprocess, embed image and caption,
cosine similarity. Only the scores come back to the driver.

Rules (`filters.clip_score`): `threshold` keeps pairs scoring at least that; `top_fraction` keeps
that fraction of all scored pairs, best first (ties: earlier row first). Scores are stored in the
manifest, and rows dropped earlier by this filter stay in the population with their stored scores,
so re-running a finished build recomputes the same cut and drops nothing more.
"""
from __future__ import annotations

import io
import logging
import math
import os
from typing import Any, Iterator

import numpy as np

from clipforge.models.spec import ModelSpec
from clipforge.pipeline import status as st
from clipforge.pipeline.errors import BuildOutputError
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.manifest_view import ManifestView
from clipforge.pipeline.spec import ClipScoreSpec
from clipforge.runtime.tar_shard_reader import samples_in

log = logging.getLogger(__name__)

_READ_CPUS = 0.25


def _read_samples(item: dict[str, Any], output_url: str, storage_options: dict[str, Any],
                  image_ext: str) -> Iterator[dict[str, Any]]:
    """The wanted samples of one shard: image bytes and caption, by row.

    A damaged tar ends its samples with a warning; the driver then names the shard whose samples are missing.
    """
    layout = OutputLayout(output_url, storage_options)
    wanted = dict(zip(item["keys"], item["rows"]))
    path = layout.tar(int(item["shard"]))
    with layout.fs.open(path, "rb") as f:
        for sample in samples_in(f, path, fields=(image_ext, "txt"), handler=_warn_and_stop):
            key = sample["__key__"].rsplit("/", 1)[-1]
            if key in wanted and image_ext in sample and "txt" in sample:
                yield {"shard": int(item["shard"]), "row": int(wanted[key]), "image": sample[image_ext],
                       "caption": sample["txt"].decode("utf-8", errors="replace")}


def _warn_and_stop(exn: Exception) -> bool:
    """webdataset's warn_and_stop, through logging and without its half-second sleep."""
    log.warning("%s", exn)
    return False


class ClipScorer:
    """One model per actor; turns batches of (image bytes, caption) into cosine similarities."""

    def __init__(self, model_spec: ModelSpec, cpus: float):
        import torch

        from clipforge.models import create_model

        torch.set_num_threads(max(1, int(cpus)))
        bundle = create_model(model_spec)
        self.model = bundle.model.eval()
        self.preprocess = bundle.preprocess_val
        self.tokenizer = bundle.tokenizer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F
        from PIL import Image

        pixels = []
        for data in batch["image"]:
            with Image.open(io.BytesIO(data)) as img:
                pixels.append(self.preprocess(img.convert("RGB")))
        with torch.no_grad():
            image = F.normalize(self.model.encode_image(torch.stack(pixels)).float(), dim=-1)
            text = F.normalize(self.model.encode_text(self.tokenizer([str(c) for c in batch["caption"]])).float(),
                               dim=-1)
        return {"shard": np.asarray(batch["shard"], np.int64), "row": np.asarray(batch["row"], np.int64),
                "score": (image * text).sum(-1).numpy().astype(np.float32)}


def _absolute_model(model: ModelSpec) -> ModelSpec:
    """Relative local config/checkpoint paths made absolute: Ray workers may run elsewhere."""
    update = {}
    if model.checkpoint and "://" not in model.checkpoint:
        update["checkpoint"] = os.path.abspath(model.checkpoint)
    if model.name.endswith(".json") and "://" not in model.name:
        update["name"] = os.path.abspath(model.name)
    return model.model_copy(update=update) if update else model


def score_samples(layout: OutputLayout, todo: dict[int, list[tuple[str, int]]], spec: ClipScoreSpec,
                  image_ext: str, env: dict[str, str]) -> dict[int, float]:
    """{row: score} for the given samples ({shard: [(key, row)]}); Ray must be up."""
    import ray

    items = [{"shard": s, "keys": [k for k, _ in pairs], "rows": [r for _, r in pairs]}
             for s, pairs in sorted(todo.items()) if pairs]
    if not items:
        return {}
    runtime_env = {"env_vars": env} if env else None
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(
        # Ray types a row function as taking the row only; fn_kwargs hands it the rest.
        _read_samples,  # type: ignore[arg-type]
        fn_kwargs={"output_url": layout.portable_url, "storage_options": layout.storage_options,
                   "image_ext": image_ext},
        num_cpus=_READ_CPUS, runtime_env=runtime_env,
    )
    ds = ds.map_batches(ClipScorer, fn_constructor_kwargs={"model_spec": _absolute_model(spec.model),
                                                           "cpus": spec.cpus_per_worker},
                        compute=ray.data.ActorPoolStrategy(size=spec.workers), num_cpus=spec.cpus_per_worker,
                        batch_size=spec.batch_size, batch_format="numpy", runtime_env=runtime_env)
    scores: dict[int, float] = {}
    for batch in ds.select_columns(["row", "score"]).iter_batches(batch_format="numpy", batch_size=4096):
        scores.update(zip(batch["row"].tolist(), batch["score"].tolist()))
    return scores


def apply_clip_score(view: ManifestView, layout: OutputLayout, spec: ClipScoreSpec, image_ext: str,
                     env: dict[str, str]) -> dict[str, Any]:
    """Score the `ok` rows not scored yet, then drop the `ok` rows the keep rule rejects."""
    todo: dict[int, list[tuple[str, int]]] = {}
    for i in view.indices_with_status(st.OK):
        key = view.key[i]
        if view.clip_score[i] is None and key:
            todo.setdefault(view.shard[i], []).append((key, view.row[i]))
    scores = score_samples(layout, todo, spec, image_ext, env)
    missing = sum(len(p) for p in todo.values()) - len(scores)
    if missing:
        shards = sorted(s for s, pairs in todo.items() if any(r not in scores for _, r in pairs))
        raise BuildOutputError(f"clip_score: {missing} samples listed as ok in the manifests of shards "
                               f"{shards[:10]} are missing from their tars (tar without image or .txt?)")
    for row, new_score in scores.items():
        view.set_score(row, new_score)

    population = [(score, view.row[i]) for i in view.indices_with_status(st.OK, st.FILTERED_CLIP_SCORE)
                  if (score := view.clip_score[i]) is not None]
    cutoff_rank: dict[int, int] = {}
    keep_n = len(population)
    if spec.top_fraction is not None:
        keep_n = math.ceil(spec.top_fraction * len(population))
        ranked = sorted(population, key=lambda p: (-p[0], p[1]))
        cutoff_rank = {row: rank for rank, (_score, row) in enumerate(ranked)}
    dropped = 0
    for i in list(view.indices_with_status(st.OK)):
        score, row = view.clip_score[i], view.row[i]
        if score is None:
            continue
        if spec.threshold is not None and score < spec.threshold:
            view.drop(row, st.FILTERED_CLIP_SCORE, f"clip score {score:.4f} below threshold {spec.threshold}")
            dropped += 1
        elif spec.top_fraction is not None and cutoff_rank[row] >= keep_n:
            view.drop(row, st.FILTERED_CLIP_SCORE,
                      f"clip score {score:.4f} ranks {cutoff_rank[row] + 1} of {len(population)}; "
                      f"top_fraction {spec.top_fraction} keeps {keep_n}")
            dropped += 1
    return {"scored": len(scores), "dropped": dropped, "population": len(population)}
