"""Fashion-MNIST test images as a class-per-folder zero-shot benchmark.

The raw digits-style images are light garments on black; the demo's training pictures
are dark drawings on white, so the benchmark images are inverted to match.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.demo.data_images import save_png_atomic

FASHION_PATH = "usr/share/datasets/fashion-mnist"
IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
# Official class names in label order, the folder names derived from them, and prompt-friendly names.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PROMPT_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
IMAGE_SIDE = 112

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


def class_folders() -> list[str]:
    """'0_t-shirt_top' ... '9_ankle_boot': the index prefix makes the folders sort into label order."""
    return [f"{i}_{name.lower().replace('/', '_').replace(' ', '_')}" for i, name in enumerate(CLASS_NAMES)]


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, rows, cols) uint8 images and (N,) uint8 labels from a pair of gzipped IDX files."""
    with gzip.open(images_gz, "rb") as f:
        raw = f.read()
    magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != _IDX_IMAGES_MAGIC or len(raw) != 16 + count * rows * cols:
        raise ValueError(f"{images_gz}: not an IDX image file (magic {magic}, {len(raw)} bytes for {count} images)")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    with gzip.open(labels_gz, "rb") as f:
        raw = f.read()
    magic, label_count = struct.unpack(">II", raw[:8])
    if magic != _IDX_LABELS_MAGIC or label_count != count or len(raw) != 8 + count:
        raise ValueError(
            f"{labels_gz}: not an IDX label file matching {images_gz} ({label_count} labels, magic {magic})"
        )
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{labels_gz}: label {labels.max()} is outside the {len(CLASS_NAMES)} Fashion-MNIST classes")
    return images, labels


def render_fashion(pixels: np.ndarray) -> Image.Image:
    """Dark-on-white RGB at IMAGE_SIDE px."""
    img = Image.fromarray(255 - pixels).resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)
    return img.convert("RGB")


def write_fashion(root: Path, out_dir: Path, per_class: int) -> list[Path]:
    """Write the first `per_class` test images of each class (file order) under out_dir/<class folder>/."""
    base = root / FASHION_PATH
    images, labels = read_idx(base / IMAGES_FILE, base / LABELS_FILE)
    folders = class_folders()
    written = []
    for label, folder in enumerate(folders):
        for index in np.flatnonzero(labels == label)[:per_class]:
            dest = out_dir / folder / f"{index:05d}.png"
            if not dest.is_file():
                save_png_atomic(render_fashion(images[index]), dest)
            written.append(dest)
    return written
