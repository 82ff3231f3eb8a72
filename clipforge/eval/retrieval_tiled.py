"""Exact top-k retrieval over score matrices too large to hold: one pass over image x caption tiles.

Each score tile `image_block @ text_block.T` is computed once and serves both directions: every
image keeps a running top-k of captions and every caption a running top-k of images, merged tile by
tile. Memory is one tile plus the running lists (queries x k), whatever the number of candidates.

The top-k sets equal a dense `torch.topk` over each query's full score row except where several
candidates tie exactly at the k-th place: which of them a dense topk keeps is its own choice, and
merging tiles may keep another of the tied candidates.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _merge(vals: Tensor, idx: Tensor, new_vals: Tensor, new_idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    both_vals = torch.cat([vals, new_vals], dim=1)
    both_idx = torch.cat([idx, new_idx], dim=1)
    top = both_vals.topk(k, dim=1, largest=True, sorted=True)
    return top.values, both_idx.gather(1, top.indices)


def _empty(n: int, k: int) -> tuple[Tensor, Tensor]:
    # -inf never outranks a real score, so these placeholders leave once k real candidates are seen.
    return torch.full((n, k), float("-inf")), torch.full((n, k), -1, dtype=torch.long)


@torch.no_grad()
def tiled_topk(image_emb: Tensor, text_emb: Tensor, k: int, tile_rows: int = 2048,
               tile_cols: int = 8192) -> tuple[Tensor, Tensor]:
    """(text_top [n_texts, k'] image indices, image_top [n_images, k''] caption indices), best first.

    k' = min(k, n_images), k'' = min(k, n_texts). Scores are dot products (cosine for normalised inputs).
    """
    if k < 1 or tile_rows < 1 or tile_cols < 1:
        raise ValueError(f"k, tile_rows and tile_cols must be >= 1; got {k}, {tile_rows}, {tile_cols}")
    image_emb, text_emb = image_emb.float(), text_emb.float()
    n_images, n_texts = len(image_emb), len(text_emb)
    k_images, k_texts = min(k, n_images), min(k, n_texts)
    text_vals, text_idx = _empty(n_texts, k_images)
    image_top = torch.empty((n_images, k_texts), dtype=torch.long)
    for i0 in range(0, n_images, tile_rows):
        block = image_emb[i0 : i0 + tile_rows]
        vals, idx = _empty(len(block), k_texts)
        for j0 in range(0, n_texts, tile_cols):
            scores = block @ text_emb[j0 : j0 + tile_cols].T
            top = scores.topk(min(k_texts, scores.shape[1]), dim=1, largest=True, sorted=False)
            vals, idx = _merge(vals, idx, top.values, top.indices + j0, k_texts)
            # The caption direction reads the tile by columns; topk along rows of a contiguous
            # transpose is several times faster than topk along dim 0.
            cols = scores.T.contiguous()
            top = cols.topk(min(k_images, cols.shape[1]), dim=1, largest=True, sorted=False)
            j1 = j0 + len(cols)
            text_vals[j0:j1], text_idx[j0:j1] = _merge(text_vals[j0:j1], text_idx[j0:j1], top.values,
                                                       top.indices + i0, k_images)
        image_top[i0 : i0 + len(block)] = idx
    return text_idx, image_top
