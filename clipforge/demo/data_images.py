"""Turning source pictures into the demo's web images: opaque RGB on white, small, saved atomically."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image

# The demo's "web" images: the model sees 224 px or less, so bigger files only cost disk and decode time.
MAX_SIDE = 256
# A few clip-art PNGs are 13,000 px squares; decoding one needs gigabytes for a 256 px result.
MAX_PIXELS = 25_000_000
MIN_SIDE = 16
# Channel spread below which a picture is one flat colour (blank) and teaches nothing.
_MIN_SPREAD = 8
# Pictures with less ink than this share of pixels are a speck on white (blank for training).
_MIN_INK = 0.005
_INK_LEVEL = 240


class ImageSkipped(Exception):
    """A source picture that cannot become a demo image; `reason` is a short counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def flatten_on_white(img: Image.Image) -> Image.Image:
    """Composite any transparency onto white and return RGB (clip art and stamps are drawn on clear backgrounds)."""
    if img.mode == "RGB":
        return img
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def shrink(img: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    if max(img.size) <= max_side:
        return img
    img = img.copy()
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def is_blank(img: Image.Image) -> bool:
    """True for one flat colour (e.g. an all-white render) or a near-invisible speck on white."""
    # An RGB image's extrema are one (low, high) pair per band; Pillow's annotation also allows a one-band pair.
    extrema = cast("tuple[tuple[int, int], ...]", img.convert("RGB").getextrema())
    if all(hi - lo < _MIN_SPREAD for lo, hi in extrema):
        return True
    gray = np.asarray(img.convert("L"))
    return float((gray < _INK_LEVEL).mean()) < _MIN_INK


def load_web_image(path: Path, max_side: int = MAX_SIDE) -> Image.Image:
    """Open a PNG/JPEG from a package as an RGB image on white, at most `max_side` px; raise ImageSkipped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as src:
                width, height = src.size
                if width * height > MAX_PIXELS:
                    raise ImageSkipped("too_large", f"{path} is {width}x{height}")
                if min(width, height) < 1 or max(width, height) < MIN_SIDE:
                    raise ImageSkipped("tiny", f"{path} is {width}x{height}")
                src.load()
                img = src
    except ImageSkipped:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageSkipped("too_large", f"{path}: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageSkipped("unreadable", f"{path}: {exc}") from exc
    img = shrink(flatten_on_white(img), max_side)
    if is_blank(img):
        raise ImageSkipped("blank", str(path))
    return img


def save_png_atomic(img: Image.Image, dest: Path) -> None:
    """Write via a temporary name so an interrupted run never leaves a truncated image behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, dest)
