"""A clipforge checkpoint as an embedding backend: the model rebuilt with PyTorch on the best local device.

Same interface as `OnnxClip` (encode_images / encode_texts / embed_pixels / embed_tokens, numpy out),
so prediction and the export report treat PyTorch and ONNX models alike.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from clipforge.export.errors import ExportError


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless a device is named."""
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise ExportError(f"unknown device {requested!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ExportError("device cuda was asked for but PyTorch sees no CUDA GPU")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _loadable(name: str) -> bool:
    from clipforge.models.errors import ModelConfigError
    from clipforge.models.registry import read_config

    try:
        read_config(name)
    except ModelConfigError:
        return False
    return True


def model_name_for(meta: dict[str, Any], checkpoint: str, override: str | None = None) -> str:
    """The architecture of a checkpoint: `override`, else what its meta.json records.

    The trainer records the built model's name, and the spec it was built from; a config given as a
    JSON path is recorded by its stem in the first, by its path in the second, hence both are tried.
    """
    if override:
        return override
    spec = meta.get("spec")
    spec_model = spec.get("model") if isinstance(spec, dict) else None
    spec_name = spec_model.get("name") if isinstance(spec_model, dict) else None
    candidates = [n for n in (meta.get("model_name"), spec_name) if isinstance(n, str) and n]
    for name in candidates:
        if _loadable(name):
            return name
    found = f" (it names {', '.join(map(repr, candidates))}, which cannot be loaded)" if candidates else ""
    raise ExportError(f"checkpoint {checkpoint}: meta.json does not name a known model{found}; "
                      "pass the architecture with --model NAME")


def load_checkpoint_model(checkpoint: str, model_name: str | None = None):
    """(ModelBundle on CPU in eval mode, resolved checkpoint directory, its meta) for a checkpoint or run directory."""
    from clipforge.models import ModelSpec, create_model
    from clipforge.models.checkpoint_files import load_meta, resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    meta = load_meta(directory)
    name = model_name_for(meta, directory, model_name)
    bundle = create_model(ModelSpec(name=name, checkpoint=directory))
    bundle.model.float().eval()
    return bundle, directory, meta


class TorchClip:
    """A ModelBundle behind the backend interface; embeddings are L2-normalised float32 numpy arrays."""

    precision = "fp32"

    def __init__(self, bundle, device: str | torch.device = "auto"):
        self.bundle = bundle
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.model = bundle.model.to(self.device).eval()
        self.logit_scale = float(self.model.logit_scale.exp().item())
        bias = getattr(self.model, "logit_bias", None)
        self.logit_bias = float(bias.item()) if isinstance(bias, torch.Tensor) else None

    @classmethod
    def from_checkpoint(cls, checkpoint: str, model_name: str | None = None, device: str = "auto") -> "TorchClip":
        bundle, _, _ = load_checkpoint_model(checkpoint, model_name)
        return cls(bundle, device)

    def preprocess(self, images: list) -> np.ndarray:
        return torch.stack([self.bundle.preprocess_val(img) for img in images]).numpy()

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return self.bundle.tokenizer(texts).numpy()

    @torch.no_grad()
    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).to(self.device)
        return self.model.encode_image(x, normalize=True).float().cpu().numpy()

    @torch.no_grad()
    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(tokens, np.int64)).to(self.device)
        return self.model.encode_text(t, normalize=True).float().cpu().numpy()

    def encode_images(self, images: list, batch_size: int = 32) -> np.ndarray:
        return np.concatenate([self.embed_pixels(self.preprocess(images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        return np.concatenate([self.embed_tokens(self.tokenize(texts[i:i + batch_size]))
                               for i in range(0, len(texts), batch_size)])
