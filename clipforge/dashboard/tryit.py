"""The 'try it' page: zero-shot probabilities of candidate captions for one uploaded image.

Models are loaded with clipforge.models.create_model on first use (torch and open_clip are not
imported before) and the last few are kept, so trying several images with one checkpoint is quick.
"""
from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict

MAX_CAPTIONS = 64
MAX_CAPTION_CHARS = 500
KEEP_MODELS = 2


class TryError(ValueError):
    """Bad input to the 'try it' page: the message says what to fix."""


def decode_image(data_url: object, max_bytes: int):
    """A PIL RGB image from a `data:image/...;base64,...` URL (what the page's file reader produces)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data_url, str) or "," not in data_url:
        raise TryError("image: expected a data URL (data:image/...;base64,...)")
    head, payload = data_url.split(",", 1)
    if not head.startswith("data:") or ";base64" not in head:
        raise TryError("image: expected a base64 data URL")
    if len(payload) * 3 // 4 > max_bytes:
        raise TryError(f"image: larger than the {max_bytes // 2**20} MiB limit")
    try:
        raw = base64.b64decode(payload, validate=True)
    except ValueError as e:
        raise TryError(f"image: not valid base64 ({e})") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise TryError(f"image: cannot be decoded ({e})") from None
    return image.convert("RGB")


def clean_captions(captions) -> list[str]:
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise TryError("captions: expected a list of strings")
    out = [c.strip() for c in captions if c.strip()]
    if not out:
        raise TryError("captions: give at least one non-empty caption")
    if len(out) > MAX_CAPTIONS:
        raise TryError(f"captions: at most {MAX_CAPTIONS} captions, got {len(out)}")
    too_long = next((i for i, c in enumerate(out) if len(c) > MAX_CAPTION_CHARS), None)
    if too_long is not None:
        raise TryError(f"captions: caption #{too_long + 1} is longer than {MAX_CAPTION_CHARS} characters")
    return out


class Predictor:
    """Loads checkpoints on demand (a few at a time) and scores captions against an image."""

    def __init__(self) -> None:
        self._models: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()

    def _bundle(self, model_name: str, checkpoint: str):
        from clipforge.models import create_model
        from clipforge.models.spec import ModelSpec

        key = (model_name, checkpoint)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        bundle = create_model(ModelSpec(name=model_name, checkpoint=checkpoint))
        bundle.model.eval()
        self._models[key] = bundle
        while len(self._models) > KEEP_MODELS:
            self._models.popitem(last=False)
        return bundle

    def predict(self, model_name: str, checkpoint: str, image, captions: list[str]) -> dict:
        import torch

        # One inference at a time: the machines this runs on are often busy training.
        with self._lock, torch.no_grad():
            bundle = self._bundle(model_name, checkpoint)
            model = bundle.model
            pixels = bundle.preprocess_val(image).unsqueeze(0)
            tokens = bundle.tokenizer(captions)
            img = model.encode_image(pixels, normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            scale = float(model.logit_scale.exp())
            logits = (scale * img @ txt.T)[0]
            probs = logits.softmax(dim=-1)
        return {
            "captions": captions,
            "probabilities": [float(p) for p in probs],
            "similarities": [float(s) for s in (img @ txt.T)[0]],
            "logit_scale": scale,
            "model": model_name,
        }
