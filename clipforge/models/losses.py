"""Contrastive (InfoNCE) loss over the global batch of all ranks, with OpenCLIP's semantics.

Each rank passes its local features; the loss all-gathers them itself. With gradient-carrying
gathers the gradient that reaches each rank's local features is the sum, over all ranks, of the
derivatives of their losses; DDP then averages parameter gradients over ranks, so the update equals
the gradient of the single-process loss on the whole global batch.
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.loss_collectives import check_feature_pair, gather_pair
from clipforge.models.loss_collectives import world as world_of
from clipforge.models.losses_siglip import SigLipLoss
from clipforge.models.losses_tiled import TiledClipLoss
from clipforge.models.spec import LossSpec


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
        rank, world = world_of()
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
        return TiledClipLoss(local_loss=spec.local_loss, gather_with_grad=spec.gather_with_grad,
                             tile_size=spec.tile_size)
    if spec.kind == "siglip":
        return SigLipLoss()
    raise ValueError(f"unknown loss kind {spec.kind!r}")


def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """Keep exp(logit_scale) within [1, max_scale] (in place, outside autograd), as CLIP does after each step."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    with torch.no_grad():
        # torch types a module attribute as `Tensor | Module`; a CLIP model's logit_scale is a parameter.
        cast(torch.Tensor, model.logit_scale).clamp_(0, math.log(max_scale))
