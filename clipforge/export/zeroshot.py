"""Zero-shot classification of an image folder with any embedding backend (PyTorch or ONNX).

Same protocol as `clipforge eval` (CLIP_benchmark): each class's prompts from the templates are
embedded and L2-normalised, averaged and renormalised; images are scored by 100 x cosine and the
metrics come from clipforge.eval.metrics.zeroshot_metrics.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from clipforge.export.errors import ExportError

_INDEX_PREFIX = re.compile(r"^\d+_")


@dataclass
class ImageFolder:
    images: list  # PIL images
    labels: list[int]
    classnames: list[str]
    folders: list[str]


def classnames_from_folders(folders: list[str]) -> list[str]:
    """'0_t-shirt_top' -> 't-shirt top': the demo's folder names without their sort prefix."""
    return [_INDEX_PREFIX.sub("", f).replace("_", " ") for f in folders]


def load_folder(folder: str, classnames: list[str] | None = None, per_class: int | None = None) -> ImageFolder:
    """A class-per-subfolder image tree, at most `per_class` images of each class (the first by name)."""
    from clipforge.eval.datasets import load_image_folder
    from clipforge.export.preprocess import load_image

    try:
        items, labels, folders = load_image_folder(str(folder))
    except ValueError as e:
        raise ExportError(str(e)) from None
    if classnames is not None and len(classnames) != len(folders):
        raise ExportError(f"{folder} has {len(folders)} class folders ({', '.join(folders)}) but "
                          f"{len(classnames)} class names were given")
    taken: dict[int, int] = {}
    images, kept = [], []
    for item, label in zip(items, labels):
        if per_class is not None and taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        images.append(load_image(item["path"]))
        kept.append(label)
    return ImageFolder(images=images, labels=kept, classnames=list(classnames or classnames_from_folders(folders)),
                       folders=folders)


def class_prompts(classname: str, templates) -> list[str]:
    if isinstance(templates, dict):
        if classname not in templates:
            raise ExportError(f"class-specific templates have no prompts for class {classname!r}")
        return list(templates[classname])
    return [t.format(c=classname) for t in templates]


def class_embeddings(backend, classnames: list[str], templates) -> np.ndarray:
    """[C, D] unit-length class embeddings from the prompt ensemble."""
    per_class = [class_prompts(c, templates) for c in classnames]
    flat = [p for prompts in per_class for p in prompts]
    emb = backend.encode_texts(flat).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    weights, start = [], 0
    for prompts in per_class:
        mean = emb[start:start + len(prompts)].mean(axis=0)
        weights.append(mean / np.linalg.norm(mean))
        start += len(prompts)
    return np.stack(weights)


def zeroshot_logits(backend, data: ImageFolder, templates, batch_size: int = 32) -> np.ndarray:
    """[N, C] scores (100 x cosine) of every image against every class."""
    classes = class_embeddings(backend, data.classnames, templates)
    images = backend.encode_images(data.images, batch_size=batch_size).astype(np.float64)
    images /= np.linalg.norm(images, axis=-1, keepdims=True)
    return 100.0 * images @ classes.T


def zeroshot_scores(logits: np.ndarray, labels: list[int]) -> dict[str, float]:
    import torch

    from clipforge.eval.metrics import zeroshot_metrics

    return zeroshot_metrics(torch.from_numpy(logits), torch.as_tensor(labels))
