"""Evaluation during training: the eval job's tasks, run inside the training workers every N steps.

The training workers hold every CPU of the cluster they asked for, so a Ray Data job started from
inside them (as `kind: eval` runs) would wait for CPUs that never free up on a small cluster. The
hook therefore embeds in-process with the model being trained: every rank embeds its share of the
images and captions, the shares are gathered, and rank 0 computes the metrics with the eval
library's functions (the same definitions as `kind: eval`). Task data is read once, at start.
"""
from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.eval.loading import load_retrieval, load_zeroshot
from clipforge.eval.metrics import retrieval_metrics, zeroshot_classifier, zeroshot_metrics
from clipforge.eval.spec import RetrievalTask, ZeroShotTask
from clipforge.eval.templates import get_templates
from clipforge.train.collectives import all_gather_object

log = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"


@dataclass
class _TaskData:
    task: RetrievalTask | ZeroShotTask
    items: list[dict]
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)
    templates: list[str] | dict[str, list[str]] = field(default_factory=list)


def _load(task: RetrievalTask | ZeroShotTask) -> _TaskData:
    where = f"eval_tasks: {task.task} on {task.dataset!r}"
    try:
        if isinstance(task, RetrievalTask):
            items, captions, caption_image = load_retrieval(task)
            return _TaskData(task, items, captions=captions, caption_image=caption_image)
        items, labels, classnames = load_zeroshot(task)
        return _TaskData(task, items, labels=labels, classnames=classnames, templates=get_templates(task.templates))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _image_bytes(item: dict) -> bytes:
    if "bytes" in item:
        return item["bytes"]
    with fsspec.open(item["path"], "rb") as f:
        return f.read()


def _require_images(td: _TaskData, kept: np.ndarray) -> None:
    # `kept` is gathered, so every rank raises together.
    if len(kept) == 0:
        raise ValueError(f"eval_tasks: {td.task.task} on {td.task.dataset!r}: none of its {len(td.items)} images "
                         "could be decoded")


class PeriodicEval:
    """Runs `tasks` on the model; call it on every rank at the same step (it gathers across ranks)."""

    def __init__(self, tasks: list, preprocess, tokenizer, rank: int, world_size: int, batch_size: int,
                 device: torch.device):
        self.data = [_load(t) for t in tasks]
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.device = device

    def _embed_images(self, model, items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(positions of the decodable images, their embeddings), gathered from every rank's share."""
        positions, pixels, chunks = [], [], []
        mine = range(self.rank, len(items), self.world_size)
        for n, i in enumerate(mine):
            try:
                with Image.open(io.BytesIO(_image_bytes(items[i]))) as im:
                    pixels.append(self.preprocess(im.convert("RGB")))
                positions.append(i)
            except Exception as e:  # noqa: BLE001 - an undecodable image is left out, as the eval job does
                log.warning("eval: skipping undecodable image %s: %s: %s", items[i].get("path", i), type(e).__name__, e)
            if pixels and (len(pixels) == self.batch_size or n == len(mine) - 1):
                batch = torch.stack(pixels).to(self.device)
                chunks.append(F.normalize(model.encode_image(batch).float(), dim=-1).cpu().numpy())
                pixels = []
        local = (np.asarray(positions, dtype=np.int64),
                 np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32))
        parts = [p for p in all_gather_object(local) if len(p[0])]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        idx = np.concatenate([p[0] for p in parts])
        emb = np.concatenate([p[1] for p in parts])
        order = np.argsort(idx, kind="stable")
        return idx[order], emb[order]

    def _embed_texts(self, model, texts: list[str]) -> torch.Tensor:
        """Embeddings of `texts` in order, each rank encoding every world_size-th one."""
        mine = list(range(self.rank, len(texts), self.world_size))
        chunks = []
        for start in range(0, len(mine), self.batch_size):
            tokens = self.tokenizer([texts[i] for i in mine[start : start + self.batch_size]]).to(self.device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
        local = (mine, torch.cat(chunks).numpy() if chunks else None)
        out: dict[int, np.ndarray] = {}
        for rows, emb in all_gather_object(local):
            if emb is not None:
                out.update(zip(rows, emb))
        return torch.from_numpy(np.stack([out[i] for i in range(len(texts))]))

    def _retrieval(self, model, td: _TaskData) -> dict:
        kept, image_emb = self._embed_images(model, td.items)
        _require_images(td, kept)
        row_of_image = np.full(len(td.items), -1, dtype=np.int64)
        row_of_image[kept] = np.arange(len(kept))
        caption_rows = row_of_image[np.asarray(td.caption_image, dtype=np.int64)]
        keep = caption_rows >= 0  # captions of an undecodable image leave with it
        text_emb = self._embed_texts(model, [c for c, k in zip(td.captions, keep) if k])
        if self.rank != 0:
            return {}
        assert isinstance(td.task, RetrievalTask)  # _retrieval is called for retrieval tasks only
        metrics = retrieval_metrics(torch.from_numpy(image_emb), text_emb, torch.from_numpy(caption_rows[keep]),
                                    ks=td.task.recall_k)
        metrics.update(n_images=len(kept), n_texts=int(keep.sum()), n_failed=len(td.items) - len(kept))
        return metrics

    def _zeroshot(self, model, td: _TaskData) -> dict:
        kept, image_emb = self._embed_images(model, td.items)
        _require_images(td, kept)
        if self.rank != 0:
            return {}
        classifier = zeroshot_classifier(model, self.tokenizer, td.classnames, td.templates, device=self.device)
        logits = 100.0 * torch.from_numpy(image_emb) @ classifier.cpu()
        metrics = zeroshot_metrics(logits, torch.as_tensor(td.labels)[torch.from_numpy(kept)])
        metrics.update(n_images=len(kept), n_classes=len(td.classnames), n_failed=len(td.items) - len(kept))
        return metrics

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """`eval/<dataset>/<metric>` -> value on rank 0 ({} elsewhere); the model's train/eval modes are kept."""
        t0 = time.perf_counter()
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            out: dict[str, float] = {}
            for td in self.data:
                if isinstance(td.task, RetrievalTask):
                    metrics = self._retrieval(model, td)
                else:
                    metrics = self._zeroshot(model, td)
                for k, v in metrics.items():
                    # Undefined metrics (acc5 below 5 classes) are left out of the log rather than written as NaN.
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        out[f"{EVAL_PREFIX}{td.task.dataset}/{k}"] = float(v)
        finally:
            for m, training in modes.items():
                m.training = training
        if self.rank == 0 and self.data:
            out["eval_seconds"] = time.perf_counter() - t0
        return out
