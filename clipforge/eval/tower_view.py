"""What the eval caches per tower, and how a model turns it into embeddings.

For models whose towers split into a trunk and a projection head (see `clipforge.models.towers`),
the cached features are the trunk outputs: they depend only on the trunk's weights, so a heads-only
fine-tune reuses its base model's features and applies its own heads on top. Other models cache
their final, normalised embeddings, keyed by the whole tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.eval.fingerprint import digest_json, digest_tensors
from clipforge.models.errors import ModelConfigError

if TYPE_CHECKING:
    from clipforge.models.towers import OpenClipModel

# EfficientNet-Lite0 at 224 px runs ~81 ms/image in batches of 16 on one CPU thread but ~123 ms at 128:
# larger batches' activations fall out of the cache.
CPU_IMAGE_CHUNK = 16
FeatureKind = Literal["trunk", "embedding"]
_SCALARS = ("logit_scale", "logit_bias")


def feature_kind(model: nn.Module) -> FeatureKind:
    from clipforge.models.towers import head_parameter_names

    try:
        head_parameter_names(model)
    except ModelConfigError:
        return "embedding"
    return "trunk"


@torch.no_grad()
def image_features(model: OpenClipModel, pixels: Tensor, kind: FeatureKind) -> Tensor:
    """Cacheable image features of a batch, computed in CPU-friendly chunks."""
    from clipforge.models import tower_features

    chunk = CPU_IMAGE_CHUNK if pixels.device.type == "cpu" else len(pixels)
    out = []
    for part in pixels.split(max(1, chunk)):
        if kind == "trunk":
            out.append(tower_features(model, images=part).float())
        else:
            out.append(F.normalize(model.encode_image(part).float(), dim=-1))
    return torch.cat(out)


def _pad_id(model: nn.Module) -> int:
    text = getattr(model, "text", None)
    config = getattr(getattr(text, "transformer", None), "config", None) or getattr(text, "config", None)
    pad = getattr(config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


@dataclass
class TowerView:
    """A model seen as (cached features -> embeddings), with the keys of its two towers' features."""

    model: OpenClipModel
    kind: FeatureKind
    image_key: str
    text_key: str

    def project_images(self, feats: np.ndarray | Tensor) -> Tensor:
        """L2-normalised image embeddings [N, D] from cached image features."""
        feats = torch.as_tensor(feats, dtype=torch.float32)
        if self.kind == "embedding":
            return feats
        from clipforge.models import ProjectionHeads

        with torch.no_grad():
            return F.normalize(ProjectionHeads(self.model).project_image(feats).float(), dim=-1)

    def project_texts(self, feats: np.ndarray | Tensor) -> Tensor:
        feats = torch.as_tensor(feats, dtype=torch.float32)
        if self.kind == "embedding":
            return feats
        from clipforge.models import ProjectionHeads

        with torch.no_grad():
            return F.normalize(ProjectionHeads(self.model).project_text(feats).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, tokens: Tensor, batch_size: int = 256) -> Tensor:
        """Cacheable features of token rows, in row order.

        Rows go through the tower longest first, so each batch holds captions of similar length and
        the Hugging Face trunk (which drops all-padding columns) runs on short sequences.
        """
        from clipforge.models import tower_features

        if len(tokens) == 0:
            raise ValueError("no texts to embed")
        lengths = (tokens != _pad_id(self.model)).sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True)
        out: Tensor | None = None
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if self.kind == "trunk":
                feats = tower_features(self.model, tokens=tokens[rows]).float()
            else:
                feats = F.normalize(self.model.encode_text(tokens[rows]).float(), dim=-1)
            if out is None:
                out = torch.empty((len(tokens), feats.shape[1]), dtype=torch.float32)
            out[rows] = feats
        assert out is not None  # tokens is not empty (checked above)
        return out


def _tower_states(model: nn.Module, kind: FeatureKind) -> tuple[dict, dict]:
    from clipforge.models.towers import head_parameter_names, unwrap

    model = unwrap(model)
    heads = set(head_parameter_names(model)) if kind == "trunk" else set()
    image: dict[str, Tensor] = {}
    text: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if name in heads or name in _SCALARS:
            continue
        (image if name.startswith("visual.") else text)[name] = value
    return image, text


def tower_view(bundle) -> TowerView:
    """The view of a built model, its towers' feature keys computed from their weights and configs."""
    model = bundle.model.eval()
    kind = feature_kind(model)
    image_state, text_state = _tower_states(model, kind)
    config = bundle.config or {}
    image_key = digest_json({"kind": kind, "class": type(model.visual).__name__,
                             "config": config.get("vision_cfg"), "weights": digest_tensors(image_state)})
    text_key = digest_json({"kind": kind, "class": type(model).__name__,
                            "config": config.get("text_cfg"), "weights": digest_tensors(text_state)})
    return TowerView(model=model, kind=kind, image_key=image_key, text_key=text_key)
