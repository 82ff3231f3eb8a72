"""Checking an export against the PyTorch model it came from, on sample images and captions.

Each stage is compared on its own (token ids, preprocessed pixels, each graph on identical inputs)
and end to end (the ONNX path's own preprocessing and tokenizer into its graphs, against open_clip's
transform and tokenizer into the PyTorch model). The samples cover what preprocessing and
tokenization must get right: image modes (grey, palette, alpha), up- and down-scaling, odd aspect
ratios; HTML entities, odd whitespace, accents, emoji, contractions, empty and over-long captions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.export.errors import ExportError

SAMPLE_CAPTIONS = [
    "a photo of a cat",
    "A RED  Dress\twith &amp; pockets ",
    "ünïcödé café – naïve Ωmega 😀",
    "It's THE dog's toy, we'll see; I'd say 3,000.5 $",
    "",
    "a drawing of " + "a very long caption " * 40,
    "an ankle boot.",
    "&lt;b&gt;bold&lt;/b&gt; sneaker",
]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _pattern(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth gradients, stripes and noise: content on every scale, so resampling differences show."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for c in range(3):
        fy, fx = rng.uniform(0.02, 0.3, size=2)
        wave = np.sin(x * fx + c) * np.cos(y * fy - c)
        ramp = (x / max(width - 1, 1)) * (c - 1) + (y / max(height - 1, 1))
        channels.append(0.5 + 0.3 * wave + 0.2 * ramp + 0.1 * rng.standard_normal((height, width)))
    return (np.clip(np.stack(channels, axis=-1), 0, 1) * 255).astype(np.uint8)


def synthetic_images(seed: int = 0) -> list[Image.Image]:
    """Six deterministic test images in the modes and shapes preprocessing has to handle."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(_pattern(240, 320, rng), "RGB")
    grey = Image.fromarray(_pattern(131, 97, rng)[..., 0], "L")
    rgba = Image.fromarray(np.dstack([_pattern(150, 150, rng), _pattern(150, 150, rng)[..., 1]]), "RGBA")
    palette = Image.fromarray(_pattern(90, 200, rng), "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    tiny = Image.fromarray(_pattern(20, 30, rng), "RGB")
    wide = Image.fromarray(_pattern(64, 500, rng), "RGB")
    return [rgb, grey, rgba, palette, tiny, wide]


def folder_images(folder: str | Path, limit: int) -> list[Image.Image]:
    """Up to `limit` images found under `folder` (sorted paths, for repeatable checks)."""
    from clipforge.export.preprocess import load_image

    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"sample image folder {folder} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:limit]
    if not paths:
        raise ExportError(f"sample image folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
    return [load_image(p) for p in paths]


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Max abs difference and cosine similarity of row-wise embeddings."""
    ref, oth = reference.astype(np.float64), other.astype(np.float64)
    cos = (ref * oth).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(oth, axis=-1) + 1e-12)
    return {"max_abs_diff": float(np.abs(ref - oth).max()), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean())}


def compare_backends(torch_clip, onnx_clip, images: list[Image.Image], captions: list[str]) -> dict:
    """Stage-by-stage and end-to-end agreement of an OnnxClip with the TorchClip of the same model."""
    torch_tokens = torch_clip.tokenize(captions)
    onnx_tokens = onnx_clip.tokenizer(captions)
    mismatched = [c for c, a, b in zip(captions, torch_tokens, onnx_tokens)
                  if a.shape != b.shape or not np.array_equal(a, b)]
    torch_pixels = torch_clip.preprocess(images)
    onnx_pixels = onnx_clip.preprocess(images)
    torch_image = torch_clip.embed_pixels(torch_pixels)
    torch_text = torch_clip.embed_tokens(torch_tokens)
    return {
        "samples": {"images": len(images), "captions": len(captions)},
        "tokens_identical": not mismatched,
        "token_mismatches": mismatched[:3],
        "pixels_max_abs_diff": float(np.abs(torch_pixels - onnx_pixels).max()),
        "image_graph": compare(torch_image, onnx_clip.embed_pixels(torch_pixels)),
        "image_pipeline": compare(torch_image, onnx_clip.embed_pixels(onnx_pixels)),
        "text_graph": compare(torch_text, onnx_clip.embed_tokens(torch_tokens)),
    }


def failures(result: dict, tolerance: float) -> list[str]:
    """What in a compare_backends result is outside `tolerance` (empty when the export is faithful)."""
    problems = []
    if not result["tokens_identical"]:
        problems.append(f"token ids differ from open_clip's tokenizer for {result['token_mismatches']!r}")
    if result["pixels_max_abs_diff"] > tolerance:
        problems.append(f"preprocessed pixels differ by up to {result['pixels_max_abs_diff']:.3g}")
    for part in ("image_graph", "image_pipeline", "text_graph"):
        diff = result[part]["max_abs_diff"]
        if not diff <= tolerance:  # also catches NaN
            problems.append(f"{part.replace('_', ' ')} embeddings differ by up to {diff:.3g}")
    return problems
