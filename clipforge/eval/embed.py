"""Image embeddings on Ray Data, text embeddings in-process.

Images flow through two stages: stateless decode + preprocess tasks, then a fixed pool of
embedding actors that each build the model once. Undecodable images are dropped and reported,
so one bad file never fails an evaluation.
"""
from __future__ import annotations

import io
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from clipforge.models.spec import ModelSpec
from clipforge.runtime.remote_env import forwarded_env
from clipforge.specbase import Scaling

if TYPE_CHECKING:
    import ray.data

    from clipforge.eval.tower_view import FeatureKind

log = logging.getLogger(__name__)

# Decoding runs beside the actors on fractional CPUs; 0.5 (not less) keeps the number of decode
# processes, each paying the torch/open_clip import once, small on small machines.
_DECODE_CPUS = 0.5
_DECODE_BATCH = 16
_ROWS_PER_BLOCK = 256


def _decode_and_preprocess(batch: dict[str, np.ndarray], preprocess: Callable) -> Iterator[dict[str, np.ndarray]]:
    """Decode each image (bytes or path) and apply `preprocess`; rows that fail are dropped and logged.

    A generator, so that a batch whose images all fail yields nothing instead of an empty block.
    """
    import fsspec
    from PIL import Image

    idxs, pixels = [], []
    for row, idx in enumerate(batch["idx"]):
        data = batch["bytes"][row] if "bytes" in batch else None
        source = f"item {int(idx)}"
        try:
            # Missing values arrive as None or NaN depending on the column's Arrow type.
            if not isinstance(data, (bytes, bytearray, memoryview)):
                path = str(batch["path"][row])
                source = f"item {int(idx)} ({path})"
                with fsspec.open(path, "rb") as f:
                    data = f.read()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                tensor = preprocess(img.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - any decode/transform failure means "skip this image"
            log.warning("skipping undecodable image %s: %s: %s", source, type(e).__name__, e)
            continue
        idxs.append(int(idx))
        pixels.append(np.asarray(tensor, dtype=np.float32))
    if pixels:
        yield {"idx": np.asarray(idxs, dtype=np.int64), "pixels": np.stack(pixels)}


class EmbedActor:
    """Holds one model; turns batches of preprocessed pixels into image features.

    `output`: `embedding` (L2-normalised image embeddings) or `trunk` (the image trunk's outputs, before
    the projection head: what the embedding cache keeps). The tower runs in chunks of 16 images on a
    CPU, whatever the batch size (see features.CPU_IMAGE_CHUNK).
    """

    def __init__(self, model_spec: ModelSpec, cpus: float, use_gpu: bool = False, output: FeatureKind = "embedding"):
        from clipforge.models import create_model

        torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = create_model(model_spec).model.to(self.device).eval()
        self.output = output

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        from clipforge.eval.tower_view import image_features

        if len(batch["idx"]) == 0:
            return
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"], dtype=np.float32)).to(self.device)
        emb = image_features(self.model, pixels, self.output)
        yield {"idx": np.asarray(batch["idx"], dtype=np.int64), "emb": emb.cpu().numpy()}


def _local_paths_absolute(model_spec: ModelSpec) -> ModelSpec:
    """Relative local config/checkpoint paths, resolved here: Ray workers may run in another directory."""
    update = {}
    for field in ("name", "checkpoint"):
        value = getattr(model_spec, field)
        if not value or "://" in value or os.path.isabs(value):
            continue
        if field == "checkpoint" or value.endswith(".json"):
            update[field] = os.path.abspath(value)
    return model_spec.model_copy(update=update) if update else model_spec


def _warn_if_no_cpu_left(scaling: Scaling) -> None:
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if scaling.workers * scaling.cpus_per_worker + _DECODE_CPUS > total:
        log.warning(
            "scaling: %d embedding workers x %.2f CPUs leave less than %.2f of the cluster's %.0f CPUs for image "
            "decoding; unless the cluster grows, the job will wait forever. Use fractional cpus_per_worker "
            "(e.g. 0.5) or fewer workers.",
            scaling.workers, scaling.cpus_per_worker, _DECODE_CPUS, total,
        )


def _absolute(path: str | None) -> str | None:
    return path if path is None or "://" in path else os.path.abspath(path)


def _default_preprocess(model_spec: ModelSpec) -> Callable:
    from clipforge.models import create_model

    return create_model(model_spec).preprocess_val


def embed_images(
    model_spec: ModelSpec,
    items: list[dict],
    batch_size: int,
    scaling: Scaling,
    preprocess: Callable | None = None,
    output: FeatureKind = "embedding",
) -> tuple[np.ndarray, list[int]]:
    """Embed images with Ray Data (Ray must be initialised, e.g. inside `ray_session`).

    `items`: dicts with `idx` (unique int) and either `bytes` (an encoded image) or `path` (local or
    fsspec). `preprocess` defaults to the model's `preprocess_val` (pass it when a bundle is already
    built, to avoid building the model once more here).
    Returns the float32 features of the images that decoded, in increasing `idx` order (L2-normalised
    embeddings, or trunk outputs with `output="trunk"`), and the sorted `idx` of the images that did not.
    """
    if output not in ("embedding", "trunk"):
        raise ValueError(f"output must be 'embedding' or 'trunk', got {output!r}")
    import ray

    if not items:
        raise ValueError("no images to embed")
    all_idx = [int(it["idx"]) for it in items]
    if len(set(all_idx)) != len(all_idx):
        raise ValueError("image items must have distinct `idx` values")
    for it in items:
        if "bytes" not in it and "path" not in it:
            raise ValueError(f"image item {it.get('idx')} has neither `bytes` nor `path`")
    model_spec = _local_paths_absolute(model_spec)
    if preprocess is None:
        preprocess = _default_preprocess(model_spec)

    _warn_if_no_cpu_left(scaling)
    # Only the columns in use, and the same ones on every row, so that all blocks share one Arrow schema.
    columns = [c for c in ("bytes", "path") if any(c in it for it in items)]
    rows: list[dict[str, Any]] = [{"idx": int(it["idx"]), **{c: it.get(c) for c in columns}} for it in items]
    for row in rows:
        if row.get("path") is not None:
            row["path"] = _absolute(row["path"])
    # Decode tasks read remote image files themselves: they need the driver's object-store settings, which a
    # cluster started before they were exported does not have.
    remote_paths = any("://" in row["path"] for row in rows if row.get("path") is not None)
    env = forwarded_env(output_is_local=not remote_paths)
    # Enough blocks and small enough batches for every actor to get work even on small datasets;
    # one block would feed one actor.
    n_blocks = min(len(rows), max(scaling.workers * 4, -(-len(rows) // _ROWS_PER_BLOCK)))
    decode_batch = max(1, min(_DECODE_BATCH, -(-len(rows) // (scaling.workers * 2))))
    ds: ray.data.Dataset = ray.data.from_items(rows, override_num_blocks=n_blocks)
    runtime_env: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    ds = ds.map_batches(
        # Ray types a batch function as taking the batch only; fn_kwargs hands it `preprocess`.
        _decode_and_preprocess,  # type: ignore[arg-type]
        fn_kwargs={"preprocess": preprocess},
        batch_size=decode_batch,
        batch_format="numpy",
        num_cpus=_DECODE_CPUS,
        **runtime_env,
    )
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "model_spec": model_spec,
            "cpus": scaling.cpus_per_worker,
            "use_gpu": scaling.gpus_per_worker > 0,
            "output": output,
        },
        concurrency=scaling.workers,
        num_cpus=scaling.cpus_per_worker,
        num_gpus=scaling.gpus_per_worker or None,
        resources=scaling.resources or None,
        batch_size=batch_size,
        batch_format="numpy",
    )
    got_idx, got_emb = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch["idx"]):
            got_idx.append(batch["idx"])
            got_emb.append(batch["emb"])
    if not got_idx:
        return np.zeros((0, 0), dtype=np.float32), sorted(all_idx)
    idx = np.concatenate(got_idx)
    emb = np.concatenate(got_emb).astype(np.float32, copy=False)
    order = np.argsort(idx, kind="stable")
    failed = sorted(set(all_idx) - set(idx.tolist()))
    if failed:
        log.warning("%d of %d images could not be decoded and were skipped (idx %s%s)",
                    len(failed), len(all_idx), failed[:10], " ..." if len(failed) > 10 else "")
    return emb[order], failed


def embed_texts(bundle, texts: list[str], batch_size: int = 256) -> Tensor:
    """L2-normalised float32 embeddings [N, D] of `texts`, computed in this process in batches.

    Through the text trunk and the projection head (see features.TowerView): captions are batched by
    length, and Hugging Face trunks skip all-padding columns.
    """
    from clipforge.eval.tower_view import TowerView, feature_kind

    if not texts:
        raise ValueError("no texts to embed")
    model = bundle.model.eval()
    view = TowerView(model=model, kind=feature_kind(model), image_key="", text_key="")
    return view.project_texts(view.text_features(bundle.tokenizer(list(texts)), batch_size=batch_size))
