"""Retrieval and zero-shot classification metrics, defined exactly as CLIP_benchmark defines them.

Pure torch (no Ray), so that the numbers can be checked in isolation and reused by any caller.

Ties: wherever CLIP_benchmark ranks with `torch.topk`, so do we, on the same score values
(`text_emb @ image_emb.T`, `100 * image_emb @ classifier`). When several candidates share the
score at the k-th place, which of them enter the top k is torch.topk's choice: deterministic for a
given device and input row, independent of the other rows, but not "lowest index first". Chunking
the queries therefore never changes a result, and results equal CLIP_benchmark's on the same
embeddings. Retrieval beyond `max_dense_scores` scores switches to tiles (`retrieval_tiled`), whose
memory does not grow with the candidate count; only exact ties at the k-th place may fall differently there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_retrieval_inputs(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D [N, D]; got image_emb {tuple(image_emb.shape)}, text_emb {tuple(text_emb.shape)}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding widths differ: images {image_emb.shape[1]}, texts {text_emb.shape[1]}")
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise ValueError(f"retrieval needs at least one image and one text; got {len(image_emb)} and {len(text_emb)}")
    if text_to_image.shape != (len(text_emb),):
        raise ValueError(
            f"text_to_image must hold one image index per text ({len(text_emb)}), "
            f"got shape {tuple(text_to_image.shape)}"
        )
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= len(image_emb):
        raise ValueError(f"text_to_image has image index {lo if lo < 0 else hi}, outside 0..{len(image_emb) - 1}")


def retrieval_hits(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
    max_dense_scores: int = 2**26,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Per-query hits: ({k: bool[n_texts]} caption->image, {k: bool[n_images]} image->caption).

    Up to `max_dense_scores` scores in all, each query chunk is ranked against all candidates with
    `torch.topk`, exactly as CLIP_benchmark ranks. Beyond it, the scores are computed once in tiles and
    both directions keep running top-k lists (`retrieval_tiled`): memory stays bounded for any size, and
    results only differ from the dense ranking where candidates tie exactly at the k-th place.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"recall k values must be >= 1, got {list(ks)}")
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    _check_retrieval_inputs(image_emb, text_emb, text_to_image)
    image_emb, text_emb = image_emb.float(), text_emb.float()
    n_images, n_texts = len(image_emb), len(text_emb)
    if n_images * n_texts > max_dense_scores:
        return _tiled_hits(image_emb, text_emb, text_to_image, ks, chunk_size, max_dense_scores)

    chunk_size = max(1, min(chunk_size, max_dense_scores // max(n_images, n_texts)))
    image_hits = {k: torch.zeros(n_texts, dtype=torch.bool) for k in ks}
    for start in range(0, n_texts, chunk_size):
        scores = text_emb[start : start + chunk_size] @ image_emb.T
        target = text_to_image[start : start + chunk_size, None]
        for k in ks:
            top = torch.topk(scores, min(int(k), n_images), dim=1).indices
            image_hits[k][start : start + chunk_size] = (top == target).any(dim=1)

    text_hits = {k: torch.zeros(n_images, dtype=torch.bool) for k in ks}
    for start in range(0, n_images, chunk_size):
        # Same values as CLIP_benchmark's `scores.T` rows: each image row against every caption.
        scores = image_emb[start : start + chunk_size] @ text_emb.T
        own = torch.arange(start, start + len(scores))[:, None]
        for k in ks:
            top = torch.topk(scores, min(int(k), n_texts), dim=1).indices
            text_hits[k][start : start + chunk_size] = (text_to_image[top] == own).any(dim=1)
    return image_hits, text_hits


def _tiled_hits(image_emb, text_emb, text_to_image, ks, chunk_size, max_dense_scores):
    from clipforge.eval.retrieval_tiled import tiled_topk

    # Tiles a quarter of the dense budget: the tile and its transposed copy live together.
    rows = max(1, min(chunk_size, 2048))
    cols = max(1, max_dense_scores // 4 // rows)
    text_top, image_top = tiled_topk(image_emb, text_emb, max(int(k) for k in ks), tile_rows=rows, tile_cols=cols)
    own = torch.arange(len(image_emb))[:, None]
    image_hits = {k: (text_top[:, : int(k)] == text_to_image[:, None]).any(dim=1) for k in ks}
    text_hits = {k: (text_to_image[image_top[:, : int(k)]] == own).any(dim=1) for k in ks}
    return image_hits, text_hits


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
    max_dense_scores: int = 2**26,
) -> dict[str, float]:
    """Recall@k for both retrieval directions over L2-normalised embeddings.

    `image_retrieval_recall@k`: each caption queries all images; a hit when its image is in the top k.
    `text_retrieval_recall@k`: each image queries all captions; a hit when ANY of its captions is in the
    top k (an image without captions is a miss, as in CLIP_benchmark). Scores are computed
    `chunk_size` queries at a time against all candidates, or in tiles for very large sets (see
    `retrieval_hits`), so memory stays bounded.
    A k larger than the number of candidates is clamped to it (every positive is then retrieved).
    """
    image_hits, text_hits = retrieval_hits(image_emb, text_emb, text_to_image, ks, chunk_size, max_dense_scores)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = image_hits[k].float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hits[k].float().mean().item()
    return metrics


def _class_prompts(classname: str, templates: list[str] | dict[str, list[str]]) -> list[str]:
    if isinstance(templates, dict):
        # Class-specific prompts (e.g. CuPL): used as written, no substitution.
        if classname not in templates:
            raise ValueError(f"class-specific templates have no prompts for class {classname!r}")
        prompts = list(templates[classname])
    else:
        prompts = []
        for template in templates:
            try:
                prompts.append(template.format(c=classname))
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"template {template!r} is not a valid `{{c}}` template: {e!r}") from None
    if not prompts:
        raise ValueError(f"no prompts for class {classname!r}")
    return prompts


def class_prompts(classnames: list[str], templates: list[str] | dict[str, list[str]]) -> list[list[str]]:
    """Every class's prompts: `{c}` templates filled in, or a class -> prompts mapping looked up."""
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    return [_class_prompts(c, templates) for c in classnames]


def classifier_from_prompts(prompt_emb: Tensor, per_class: list[list[str]]) -> Tensor:
    """Zero-shot weights [D, C] from embeddings of the flattened prompts (class by class, in order):
    each prompt embedding L2-normalised, averaged per class, the mean renormalised."""
    counts = [len(p) for p in per_class]
    if len(prompt_emb) != sum(counts):
        raise ValueError(f"{len(prompt_emb)} prompt embeddings for {sum(counts)} prompts")
    prompt_emb = F.normalize(prompt_emb.float(), dim=-1)
    weights = [chunk.mean(dim=0) for chunk in prompt_emb.split(counts)]
    return torch.stack([w / w.norm() for w in weights], dim=1)


@torch.no_grad()
def zeroshot_classifier(
    model,
    tokenizer,
    classnames: list[str],
    templates: list[str] | dict[str, list[str]],
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> Tensor:
    """Zero-shot weights [D, C]: per class, embed every prompt, L2-normalise each, average, renormalise.

    `templates` is a list of `{c}` templates, or a dict classname -> prompts. Prompts of all classes are
    encoded together in batches of `batch_size` (the averaging stays per class).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_class = class_prompts(classnames, templates)
    flat = [p for prompts in per_class for p in prompts]
    chunks = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start : start + batch_size]).to(device)
        chunks.append(model.encode_text(tokens).float())
    return classifier_from_prompts(torch.cat(chunks), per_class)


def zeroshot_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """`acc1`, `acc5` and `mean_per_class_recall` (balanced accuracy) of single-label predictions.

    As in CLIP_benchmark: both accuracies come from one `topk(5)` per image, acc1 being its first entry
    (acc5 is NaN below 5 classes, where `topk(1)` is taken); mean per-class recall uses the argmax and
    averages the recall of every class present in `labels`. Under exact ties the first topk entry and
    the argmax may name different classes; CLIP_benchmark has the same split and we keep it.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"need logits [N, C] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("zero-shot metrics need at least one labelled image")
    n_classes = logits.shape[1]
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}; got {int(labels.min())}..{int(labels.max())}")

    max_k = 5 if n_classes >= 5 else 1
    top = logits.topk(max_k, dim=1, largest=True, sorted=True).indices
    correct = top == labels[:, None]
    acc1 = correct[:, :1].any(dim=1).float().mean().item()
    acc5 = correct[:, :5].any(dim=1).float().mean().item() if max_k == 5 else math.nan

    pred = logits.argmax(dim=1)
    recalls = [(pred[labels == c] == c).double().mean() for c in labels.unique()]
    mean_per_class_recall = torch.stack(recalls).mean().item()
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mean_per_class_recall}
