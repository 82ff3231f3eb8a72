"""Memory-bounded InfoNCE: ClipLoss's loss and gradients without ever holding the B x B logits.

The logits are visited in tiles of `tile_size` x `tile_size`. The forward pass keeps, per row (and per
column where both directions are needed), a running maximum and a running sum of exponentials, so the
log-sum-exp of every row is exact once all tiles have been seen. The backward pass recomputes each tile
from the features and the saved log-sum-exps and accumulates the feature gradients tile by tile.
Memory is O(B * dim + tile_size^2) instead of O(B^2); the price is one extra matrix product (the
recomputation) per tile.

Across ranks the features are all-gathered exactly as ClipLoss does, and each rank's loss is the same
as ClipLoss's: with `local_loss`, rank r scores its image rows against all texts and its text rows
against all images (the r-th block of rows of the logits and of their transpose); otherwise every rank
scores the whole global matrix.
"""
from __future__ import annotations

import torch
from torch import nn

from clipforge.models.loss_collectives import check_feature_pair, gather_pair
from clipforge.models.loss_collectives import world as world_of


def _online_lse_update(run_max: torch.Tensor, run_sum: torch.Tensor, tile: torch.Tensor, dim: int,
                       work: torch.Tensor) -> None:
    """Fold one tile into running (max, sum of exp(x - max)) statistics along `dim`, in place."""
    new_max = torch.maximum(run_max, tile.amax(dim))
    run_sum.mul_(torch.exp(run_max - new_max))
    run_sum.add_(torch.sub(tile, new_max.unsqueeze(dim), out=work).exp_().sum(dim))
    run_max.copy_(new_max)


def _tiles(n: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, n)) for start in range(0, n, tile)]


class _Scratch:
    """Reused tile-sized buffers: allocating (and page-faulting) fresh ones per tile costs as much as the math."""

    def __init__(self, count: int, rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype):
        self.buffers = [torch.empty(rows * cols, dtype=dtype, device=like.device) for _ in range(count)]

    def get(self, index: int, rows: int, cols: int) -> torch.Tensor:
        return self.buffers[index][:rows * cols].view(rows, cols)


class _TiledCrossEntropy(torch.autograd.Function):
    """w_row * mean_i CE(row i of S, label offset+i)  +  w_col * mean_j CE(column j of S, label j).

    S = scale * a @ b.T, of shape [n, N]. The column term is only defined for a square S (n == N,
    offset 0) and is skipped when w_col == 0.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int, tile: int,
                w_row: float, w_col: float) -> torch.Tensor:
        n, big_n = a.shape[0], b.shape[0]
        stat_dtype = torch.promote_types(a.dtype, torch.float32)
        row_max = torch.full((n,), float("-inf"), dtype=stat_dtype, device=a.device)
        row_sum = torch.zeros(n, dtype=stat_dtype, device=a.device)
        with_cols = w_col != 0
        if with_cols:
            col_max = torch.full((big_n,), float("-inf"), dtype=stat_dtype, device=a.device)
            col_sum = torch.zeros(big_n, dtype=stat_dtype, device=a.device)
        row_tiles, col_tiles = _tiles(n, tile), _tiles(big_n, tile)
        scratch = _Scratch(2, min(tile, n), min(tile, big_n), a, stat_dtype)
        for rows in row_tiles:
            a_scaled = (scale * a[rows]).to(stat_dtype)
            for cols in col_tiles:
                shape = (rows.stop - rows.start, cols.stop - cols.start)
                logits = torch.mm(a_scaled, b[cols].T.to(stat_dtype), out=scratch.get(0, *shape))
                work = scratch.get(1, *shape)
                _online_lse_update(row_max[rows], row_sum[rows], logits, 1, work)
                if with_cols:
                    _online_lse_update(col_max[cols], col_sum[cols], logits, 0, work)
        positives = ((scale * a) * b[offset:offset + n]).sum(dim=1).to(stat_dtype)
        row_lse = row_max + row_sum.log()
        loss = w_row * (row_lse - positives).mean()
        col_lse = None
        if with_cols:
            col_lse = col_max + col_sum.log()
            loss = loss + w_col * (col_lse - positives).mean()
        ctx.save_for_backward(a, b, scale, row_lse, col_lse if with_cols else row_lse)
        ctx.cfg = (offset, tile, w_row, w_col)
        return loss.to(a.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        offset, tile, w_row, w_col = ctx.cfg
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        n, big_n = a.shape[0], b.shape[0]
        with_cols = w_col != 0
        stat_dtype = row_lse.dtype
        g = grad_loss.to(stat_dtype)
        # d loss / d logits = g_row * softmax_rows + g_col * softmax_cols - (g_row + g_col) * [j == offset + i]
        g_row = g * (w_row / n)
        g_col = g * (w_col / big_n)
        # Gradients w.r.t. the unscaled products a_i . b_j; the scale is applied once at the end.
        grad_a = torch.zeros_like(a, dtype=stat_dtype) if (need_a or need_scale) else None
        grad_b = torch.zeros_like(b, dtype=stat_dtype) if need_b else None
        scratch = _Scratch(2, min(tile, n), min(tile, big_n), a, stat_dtype)
        for rows in _tiles(n, tile):
            a_rows = a[rows].to(stat_dtype)
            a_scaled = scale * a_rows
            for cols in _tiles(big_n, tile):
                b_cols = b[cols].to(stat_dtype)
                shape = (rows.stop - rows.start, cols.stop - cols.start)
                logits = torch.mm(a_scaled, b_cols.T, out=scratch.get(0, *shape))
                probs = torch.sub(logits, row_lse[rows].unsqueeze(1), out=scratch.get(1, *shape)).exp_().mul_(g_row)
                if with_cols:
                    probs.add_(logits.sub_(col_lse[cols].unsqueeze(0)).exp_().mul_(g_col))
                if grad_a is not None:
                    grad_a[rows].addmm_(probs, b_cols)
                if grad_b is not None:
                    grad_b[cols].addmm_(probs.T, a_rows)
        diag = g_row + g_col
        if grad_a is not None:
            grad_a.sub_(diag * b[offset:offset + n].to(stat_dtype))
        if grad_b is not None:
            grad_b[offset:offset + n].sub_(diag * a.to(stat_dtype))
        grad_scale = None
        if need_scale:
            # d loss / d scale = sum_ij G_ij (a_i . b_j) = sum_i a_i . (G b)_i
            grad_scale = (a.to(stat_dtype) * grad_a).sum().reshape(scale.shape).to(scale.dtype)
        out_a = (scale * grad_a).to(a.dtype) if need_a else None
        out_b = (scale * grad_b).to(b.dtype) if need_b else None
        return out_a, out_b, grad_scale, None, None, None, None


def tiled_cross_entropy(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int = 0,
                        tile: int = 1024, w_row: float = 1.0, w_col: float = 0.0) -> torch.Tensor:
    """w_row * mean row CE + w_col * mean column CE of scale * a @ b.T, positives at (i, offset + i)."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=a.dtype, device=a.device)
    if w_col and (a.shape[0] != b.shape[0] or offset):
        raise ValueError("the column direction needs a square logit matrix (same row and column count, offset 0)")
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"positives at rows {offset}..{offset + a.shape[0]} lie outside the {b.shape[0]} columns")
    return _TiledCrossEntropy.apply(a, b, scale, int(offset), int(tile), float(w_row), float(w_col))


class TiledClipLoss(nn.Module):
    """ClipLoss (same constructor, call and result) whose memory grows linearly in the batch, not quadratically.

    `tile_size` bounds the logits held at once to tile_size x tile_size; larger tiles are faster
    up to the point where they stop fitting in cache.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, tile_size: int = 1024):
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.tile_size = tile_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        check_feature_pair(image_features, text_features)
        rank, world = world_of()
        tile = self.tile_size
        if world == 1:
            return tiled_cross_entropy(image_features, text_features, logit_scale, 0, tile, 0.5, 0.5)
        all_img, all_txt, sizes = gather_pair(image_features, text_features, self.local_loss,
                                              self.gather_with_grad)
        if not self.local_loss:
            return tiled_cross_entropy(all_img, all_txt, logit_scale, 0, tile, 0.5, 0.5)
        offset = sum(sizes[:rank])
        image_to_text = tiled_cross_entropy(image_features, all_txt, logit_scale, offset, tile)
        text_to_image = tiled_cross_entropy(text_features, all_img, logit_scale, offset, tile)
        return (image_to_text + text_to_image) / 2
