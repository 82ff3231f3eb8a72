"""Contrastive (InfoNCE) loss over the global batch of all ranks, with OpenCLIP's semantics.

Each rank passes its local features; the loss all-gathers them itself. With gradient-carrying
gathers the gradient that reaches each rank's local features is the sum, over all ranks, of the
derivatives of their losses; DDP then averages parameter gradients over ranks, so the update equals
the gradient of the single-process loss on the whole global batch.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipforge.models.spec import LossSpec


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor, sizes: list[int], rank: int, with_grad: bool, keep_local_grad: bool) -> torch.Tensor:
    """Rows of every rank, in rank order. Batches of unequal size are padded for the collective.

    Without `with_grad` only the local rows can carry gradient, and only if `keep_local_grad`
    (OpenCLIP does so for the full-matrix loss, where the local rows appear only inside the gather).
    """
    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0])) if x.shape[0] < longest else x
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():
            # Deprecated in favour of a private functional collective; its autograd (a sum of every
            # rank's gradient into the local rows) is exactly what the loss needs, and the warning
            # would otherwise appear in every training worker's log.
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(dist_fn.all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.detach().contiguous())
        if keep_local_grad:
            parts[rank] = padded
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def check_feature_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"image and text features must both be [batch, dim], got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )


def batch_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local batch size, in rank order."""
    # Gloo cannot gather CUDA tensors and NCCL cannot gather CPU ones: use the features' device.
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def gather_pair(image_features: torch.Tensor, text_features: torch.Tensor, local_loss: bool,
                with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Both modalities' global rows and the per-rank sizes (the contrastive losses' one communication)."""
    rank = dist.get_rank()
    sizes = batch_sizes(image_features.shape[0], image_features.device)
    keep_local = not local_loss
    all_img = _gather(image_features, sizes, rank, with_grad, keep_local)
    all_txt = _gather(text_features, sizes, rank, with_grad, keep_local)
    return all_img, all_txt, sizes


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: image i matches text i among all texts of the global batch, and vice versa.

    local_loss=True: each rank scores only its own rows against all global columns (labels offset by
    the rows of lower ranks), so the loss is the mean over this rank's rows; averaged over ranks it is
    the global loss. local_loss=False: every rank computes the full global B x B loss.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        check_feature_pair(image_features, text_features)
        rank, world = _world()
        n = image_features.shape[0]
        if world == 1:
            logits_img = logit_scale * image_features @ text_features.T
            logits_txt = logits_img.T
            labels = torch.arange(n, device=image_features.device)
        else:
            all_img, all_txt, sizes = gather_pair(image_features, text_features, self.local_loss,
                                                  self.gather_with_grad)
            if self.local_loss:
                logits_img = logit_scale * image_features @ all_txt.T
                logits_txt = logit_scale * text_features @ all_img.T
                labels = torch.arange(n, device=image_features.device) + sum(sizes[:rank])
            else:
                logits_img = logit_scale * all_img @ all_txt.T
                logits_txt = logits_img.T
                labels = torch.arange(sum(sizes), device=image_features.device)
        return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2



def create_loss(spec: LossSpec) -> nn.Module:
    """The loss module of `spec.kind`; `siglip` is called with the model's logit bias as a 4th argument."""
    if spec.kind == "clip":
        return ClipLoss(local_loss=spec.local_loss, gather_with_grad=spec.gather_with_grad)
    if spec.kind == "clip_tiled":
        from clipforge.models.losses_tiled import TiledClipLoss

        return TiledClipLoss(local_loss=spec.local_loss, gather_with_grad=spec.gather_with_grad,
                             tile_size=spec.tile_size)
    if spec.kind == "siglip":
        from clipforge.models.losses_siglip import SigLipLoss

        return SigLipLoss()
    raise ValueError(f"unknown loss kind {spec.kind!r}")


def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """Keep exp(logit_scale) within [1, max_scale] (in place, outside autograd), as CLIP does after each step."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))
