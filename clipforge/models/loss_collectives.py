"""The one communication of the contrastive losses: every rank's feature rows, gathered with or without gradient.

The losses own their all-gather (`losses.py`, `losses_tiled.py`; `losses_siglip.py` passes text features
round a ring instead); these are the pieces they share.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size), (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor, sizes: list[int], rank: int, with_grad: bool, keep_local_grad: bool) -> torch.Tensor:
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
    all_img = gather_rows(image_features, sizes, rank, with_grad, keep_local)
    all_txt = gather_rows(text_features, sizes, rank, with_grad, keep_local)
    return all_img, all_txt, sizes
