"""Sigmoid (SigLIP) loss: every image-text pair is an independent binary match / no-match decision.

Each rank scores its own images against every text of the global batch. Texts are not all-gathered:
they travel around the ranks in a ring, one neighbour hop per step, in both directions at once, so a
rank holds at most three text blocks at a time (its own and the two in transit) and world-1 blocks
arrive in ceil((world-1)/2) steps. The hops carry gradients back along the same links, so every text
block receives the derivative of every rank's loss with respect to it.

Per rank the loss is sum over its images i and all texts j of -log sigmoid(z_ij * (scale * x_i . y_j + bias)),
z = +1 for the matching pair and -1 otherwise, divided by the rank's image count (as in SigLIP and
OpenCLIP). With DDP averaging gradients over ranks this trains the mean of the ranks' losses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipforge.models.loss_collectives import batch_sizes, check_feature_pair
from clipforge.models.loss_collectives import world as world_of


def _exchange(sends: list[tuple[torch.Tensor, int]], receives: list[tuple[int, torch.Size]],
              like: torch.Tensor) -> list[torch.Tensor]:
    """Point-to-point: send each (tensor, destination rank), receive each (source rank, shape), all at once."""
    received = [torch.empty(shape, dtype=like.dtype, device=like.device) for _, shape in receives]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer) for buf, (peer, _) in zip(received, receives)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingHop(torch.autograd.Function):
    """Tensor k goes to rank + shifts[k]; what arrives is rank - shifts[k]'s tensor k (of shape in_shapes[k]).

    Backward is the same hop reversed: each received tensor's gradient returns to where it came from.
    """

    @staticmethod
    def forward(ctx, shifts: tuple[int, ...], in_shapes: tuple[torch.Size, ...], *tensors: torch.Tensor):
        rank, world = dist.get_rank(), dist.get_world_size()
        ctx.shifts = shifts
        ctx.out_shapes = tuple(t.shape for t in tensors)
        sends = [(t, (rank + s) % world) for t, s in zip(tensors, shifts)]
        receives = [((rank - s) % world, shape) for s, shape in zip(shifts, in_shapes)]
        return tuple(_exchange(sends, receives, tensors[0]))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        rank, world = dist.get_rank(), dist.get_world_size()
        sends = [(g, (rank - s) % world) for g, s in zip(grads, ctx.shifts)]
        receives = [((rank + s) % world, shape) for s, shape in zip(ctx.shifts, ctx.out_shapes)]
        return (None, None, *_exchange(sends, receives, grads[0]))


def ring_hop(tensors: list[torch.Tensor], shifts: list[int], in_shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Differentiable neighbour exchange: send tensors[k] `shifts[k]` ranks on, receive from as far back."""
    return list(_RingHop.apply(tuple(shifts), tuple(in_shapes), *tensors))


def _pair_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
               logit_bias: torch.Tensor, with_positives: bool) -> torch.Tensor:
    """Sum of -log sigmoid(z * logit) over a block of pairs; positives on the diagonal if `with_positives`."""
    logits = logit_scale * images @ texts.T + logit_bias
    # -log sigmoid(-x) = softplus(x): every pair is a negative, then the diagonal is corrected.
    loss = F.softplus(logits).sum()
    if with_positives:
        # For a positive pair: -log sigmoid(x) = softplus(x) - x.
        loss = loss - logits.diagonal().sum()
    return loss


class SigLipLoss(nn.Module):
    """Sigmoid loss over the global batch; called as loss(image_features, text_features, logit_scale, logit_bias)."""

    def __init__(self, bidirectional: bool = True):
        super().__init__()
        self.bidirectional = bidirectional

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError(
                "the siglip loss needs the model's logit bias (its 4th output): build the model with one "
                "(model.init_logit_bias in the job spec, or init_logit_bias in the model config)"
            )
        check_feature_pair(image_features, text_features)
        n = image_features.shape[0]
        loss = _pair_loss(image_features, text_features, logit_scale, logit_bias, with_positives=True)
        rank, world = world_of()
        if world > 1:
            sizes = batch_sizes(n, image_features.device)
            for block in self._foreign_text_blocks(text_features, sizes, rank, world):
                loss = loss + _pair_loss(image_features, block, logit_scale, logit_bias, with_positives=False)
        return loss / n

    def _foreign_text_blocks(self, texts: torch.Tensor, sizes: list[int], rank: int, world: int):
        """Every other rank's text block, arriving by neighbour hops (both ring directions unless disabled)."""
        dim = texts.shape[1]
        forward_hops = (world - 1 + 1) // 2 if self.bidirectional else world - 1
        backward_hops = (world - 1) // 2 if self.bidirectional else 0
        from_left = from_right = texts
        for step in range(1, forward_hops + 1):
            # Block from rank - step travels right (+1); block from rank + step travels left (-1).
            tensors, shifts = [from_left], [1]
            shapes = [torch.Size((sizes[(rank - step) % world], dim))]
            if step <= backward_hops:
                tensors.append(from_right)
                shifts.append(-1)
                shapes.append(torch.Size((sizes[(rank + step) % world], dim)))
            arrived = ring_hop(tensors, shifts, shapes)
            from_left = arrived[0]
            yield from_left
            if len(arrived) > 1:
                from_right = arrived[1]
                yield from_right
