"""Decoding, filtering, resizing and encoding one downloaded image, with img2dataset's resize semantics.

Resize modes (as img2dataset, upscaling small images too):
- `no`: size unchanged;
- `keep_ratio`: shorter side to `size`;
- `keep_ratio_largest`: longer side to `size`;
- `center_crop`: shorter side to `size`, then the centred `size`x`size` square;
- `border`: longer side to `size`, then padded with white to `size`x`size`, image centred.
New side lengths are `max(1, round(side * scale))`; downscaling averages pixels (area), upscaling
uses Lanczos. Transparent images are composited on white; EXIF orientation is applied first, so
sizes and filters refer to the image as it is meant to be seen.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import cast

from PIL import Image, ImageOps, UnidentifiedImageError

from clipforge.pipeline import status as st
from clipforge.pipeline.phash import phash, to_hex
from clipforge.pipeline.spec import FilterSpec, ResizeSpec

_WHITE = (255, 255, 255)
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# EXIF orientations 5-8 swap width and height.
_TRANSPOSED = {5, 6, 7, 8}

# We check pixel counts against max_pixels ourselves before decoding; Pillow's warning adds nothing.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class ImageRejected(Exception):
    """The bytes are not a usable image; `code` is the manifest status."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class EncodedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str  # of `data`, the bytes stored in the shard
    phash: str | None = None  # perceptual hash of the stored pixels (16 hex digits)


def target_size(width: int, height: int, resize: ResizeSpec) -> tuple[int, int]:
    """Size of the resized image before any padding or cropping."""
    if resize.mode == "no":
        return width, height
    if resize.mode in ("keep_ratio", "center_crop"):
        scale = resize.size / min(width, height)
    else:  # border, keep_ratio_largest
        scale = resize.size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def output_size(width: int, height: int, resize: ResizeSpec) -> tuple[int, int]:
    """Final stored size for an image of this (oriented) size."""
    if resize.mode in ("border", "center_crop"):
        return resize.size, resize.size
    return target_size(width, height, resize)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected(st.TOO_MANY_PIXELS, str(e)) from None
    except UnidentifiedImageError:
        raise ImageRejected(st.NOT_AN_IMAGE, f"not a known image format (starts with {data[:16]!r})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageRejected(st.NOT_AN_IMAGE, f"cannot read image header: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageRejected(st.NOT_AN_IMAGE, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageRejected(st.TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels exceeds max_pixels {max_pixels}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        return 1


def _check_filters(width: int, height: int, filters: FilterSpec) -> None:
    short, long = min(width, height), max(width, height)
    if short < filters.min_image_size:
        raise ImageRejected(
            st.TOO_SMALL, f"{width}x{height}: shorter side below min_image_size {filters.min_image_size}"
        )
    if filters.max_aspect_ratio is not None and long / short > filters.max_aspect_ratio:
        raise ImageRejected(
            st.BAD_ASPECT_RATIO, f"{width}x{height}: aspect ratio {long / short:.2f} above {filters.max_aspect_ratio}"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (as img2dataset's alpha matting)."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High-bit-depth greyscale: scale to 8 bits instead of letting convert() clip at 255.
        # One band: a single (low, high) pair (Pillow's annotation also allows one pair per band).
        lo, hi = cast("tuple[float, float]", img.getextrema())
        span = (hi - lo) or 1
        img = img.point(lambda v: (v - lo) * 255.0 / span).convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize(img: Image.Image, resize: ResizeSpec) -> Image.Image:
    w, h = img.size
    new = target_size(w, h, resize)
    if new != (w, h):
        downscale = new[0] * new[1] < w * h
        img = img.resize(new, Image.Resampling.BOX if downscale else Image.Resampling.LANCZOS)
    size = resize.size
    if resize.mode == "center_crop":
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif resize.mode == "border" and img.size != (size, size):
        canvas = Image.new("RGB", (size, size), _WHITE)
        canvas.paste(img, (int((size - img.width) / 2.0), int((size - img.height) / 2.0)))
        img = canvas
    return img


def _encode(img: Image.Image, image_format: str, quality: int) -> bytes:
    out = io.BytesIO()
    if image_format == "png":
        img.save(out, format="PNG")
    else:
        img.save(out, format=_PIL_FORMATS[image_format], quality=quality)
    return out.getvalue()


def process_image(
    data: bytes, resize: ResizeSpec, filters: FilterSpec, max_pixels: int, image_format: str, quality: int
) -> EncodedImage:
    """Decode (refusing decompression bombs before decoding), filter, resize and re-encode one image."""
    img = _open(data, max_pixels)
    raw_w, raw_h = img.size
    # Shorter side and aspect ratio do not change under rotation: filter before reading any EXIF.
    _check_filters(raw_w, raw_h, filters)
    orient = _orientation(img)
    orig_w, orig_h = (raw_h, raw_w) if orient in _TRANSPOSED else (raw_w, raw_h)
    if img.format == "JPEG" and resize.mode != "no":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result is still at least the target size.
        tw, th = target_size(orig_w, orig_h, resize)
        if orient in _TRANSPOSED:
            tw, th = th, tw
        img.draft(None, (tw, th))
    try:
        img.load()
        if orient != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageRejected(st.NOT_AN_IMAGE, f"cannot decode image: {e}") from None
    img = _resize(img, resize)
    try:
        encoded = _encode(img, image_format, quality)
    except (OSError, ValueError) as e:
        raise ImageRejected(st.NOT_AN_IMAGE, f"cannot encode {img.width}x{img.height} as {image_format}: {e}") from None
    return EncodedImage(encoded, img.width, img.height, orig_w, orig_h, hashlib.sha256(encoded).hexdigest(),
                        to_hex(phash(img)))
