"""Image preprocessing with Pillow and numpy only, equal to open_clip's evaluation transform.

open_clip resizes the image in its original mode (palette, grey, RGBA ...) and converts to RGB
afterwards, with torchvision's PIL backend: sizes and crop offsets below follow the same rounding,
and the pixel work is done by the same Pillow calls, so the arrays match its tensors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipforge.export.errors import ExportError
from clipforge.export.manifest import ImagePreprocess

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so the file handle is released), with a clear error for non-images."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise ExportError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ExportError(f"cannot read image {path}: {e}") from None


def _shortest_edge_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the short edge at `side`; the long edge is truncated, as torchvision does."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def _keep_ratio_size(width: int, height: int, target_h: int, target_w: int, longest: bool) -> tuple[int, int]:
    ratio_h, ratio_w = height / target_h, width / target_w
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(width / ratio), round(height / ratio)


def _center_crop_or_pad(img: Image.Image, target_h: int, target_w: int, fill: int) -> Image.Image:
    width, height = img.size
    if target_w > width or target_h > height:
        pad_left = (target_w - width) // 2 if target_w > width else 0
        pad_top = (target_h - height) // 2 if target_h > height else 0
        padded_w, padded_h = max(width, target_w), max(height, target_h)
        canvas = Image.new(img.mode, (padded_w, padded_h), _fill_value(img.mode, fill))
        palette = img.getpalette() if img.mode == "P" and img.palette is not None else None
        if palette is not None:
            canvas.putpalette(palette)
        canvas.paste(img, (pad_left, pad_top))
        img, (width, height) = canvas, (padded_w, padded_h)
        if (width, height) == (target_w, target_h):
            return img
    top = int(round((height - target_h) / 2.0))
    left = int(round((width - target_w) / 2.0))
    return img.crop((left, top, left + target_w, top + target_h))


def _fill_value(mode: str, fill: int):
    return fill if Image.getmodebands(mode) == 1 else tuple([fill] * Image.getmodebands(mode))


def resize_and_crop(img: Image.Image, cfg: ImagePreprocess) -> Image.Image:
    target_h, target_w = cfg.size
    resample = _RESAMPLE[cfg.interpolation]
    width, height = img.size
    if cfg.resize_mode == "squash":
        return img.resize((target_w, target_h), resample)
    if cfg.resize_mode == "longest":
        img = img.resize(_keep_ratio_size(width, height, target_h, target_w, longest=True), resample)
        return _center_crop_or_pad(img, target_h, target_w, cfg.fill_color)
    if target_h == target_w:
        new_size = _shortest_edge_size(width, height, target_h)
    else:
        new_size = _keep_ratio_size(width, height, target_h, target_w, longest=False)
    if new_size != (width, height):
        img = img.resize(new_size, resample)
    return _center_crop_or_pad(img, target_h, target_w, 0)


def to_array(img: Image.Image, cfg: ImagePreprocess) -> np.ndarray:
    """One image -> float32 [3, H, W], normalised with the export's mean and std."""
    rgb = resize_and_crop(img, cfg).convert("RGB")
    arr = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1).copy()


def batch(images: list[Image.Image], cfg: ImagePreprocess) -> np.ndarray:
    """Images -> float32 [N, 3, H, W]."""
    if not images:
        raise ExportError("no images to preprocess")
    return np.stack([to_array(img, cfg) for img in images])
