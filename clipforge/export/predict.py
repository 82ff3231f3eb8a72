"""`clipforge predict`: how well each caption matches an image, from a checkpoint or an ONNX export.

An ONNX export runs on onnxruntime with numpy, Pillow and tokenizers only; PyTorch is imported
only for checkpoints (and then runs on CUDA, Apple MPS or the CPU, whichever is there).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipforge.export.errors import ExportError
from clipforge.export.manifest import is_export_dir, read_manifest


@dataclass
class Prediction:
    caption: str
    probability: float
    logit: float


def load_backend(model: str | Path, precision: str = "auto", device: str = "auto", arch: str | None = None,
                 threads: int | None = None):
    """OnnxClip for an export directory (int8 when it has int8 graphs and precision is `auto`),
    TorchClip for a checkpoint or run directory."""
    if is_export_dir(model):
        from clipforge.export.onnx_runtime import OnnxClip

        if precision == "auto":
            precision = "int8" if "int8" in read_manifest(model).image.files else "fp32"
        return OnnxClip(model, precision=precision, device=device, threads=threads)
    if precision not in ("auto", "fp32"):
        raise ExportError(f"precision {precision!r} needs an ONNX export directory; {model} is a checkpoint "
                          "(PyTorch checkpoints run in fp32)")
    if not Path(model).exists() and "://" not in str(model):
        raise ExportError(f"model {model} does not exist (expected an ONNX export directory or a checkpoint)")
    from clipforge.export.torch_backend import TorchClip

    return TorchClip.from_checkpoint(str(model), model_name=arch, device=device)


def describe(backend) -> str:
    providers = getattr(backend, "providers", None)
    if providers is not None:
        return f"ONNX {backend.precision} on {providers[0]}"
    return f"PyTorch fp32 on {backend.device}"


def predict(backend, image, captions: list[str]) -> list[Prediction]:
    """Probability of each caption for `image` (a PIL image), in the order given.

    CLIP-style models (no logit bias): softmax over the captions of the scaled cosine similarities.
    Models trained with a logit bias (sigmoid loss): each caption's own sigmoid.
    """
    if not captions:
        raise ExportError("predict needs at least one caption")
    image_emb = backend.encode_images([image])[0].astype(np.float64)
    text_emb = backend.encode_texts(list(captions)).astype(np.float64)
    logits = backend.logit_scale * (text_emb @ image_emb)
    if backend.logit_bias is not None:
        logits = logits + backend.logit_bias
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        shifted = np.exp(logits - logits.max())
        probs = shifted / shifted.sum()
    return [Prediction(c, float(p), float(z)) for c, p, z in zip(captions, probs, logits)]


def format_table(predictions: list[Prediction]) -> str:
    """Captions by decreasing probability, as an aligned text table."""
    ranked = sorted(predictions, key=lambda p: -p.probability)
    lines = [f"{'rank':>4}  {'probability':>11}  caption"]
    lines += [f"{i:>4}  {p.probability:>11.4f}  {p.caption}" for i, p in enumerate(ranked, 1)]
    return "\n".join(lines)


def plot_predictions(predictions: list[Prediction], path: str | Path, title: str) -> Path:
    """Horizontal bar chart of the probabilities (highest on top), written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted(predictions, key=lambda p: p.probability)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(ranked) + 1.2))
    labels = [p.caption if len(p.caption) <= 60 else p.caption[:57] + "..." for p in ranked]
    bars = ax.barh(range(len(ranked)), [p.probability for p in ranked], color="#4c72b0")
    ax.set_yticks(range(len(ranked)), labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.set_title(title, fontsize=10)
    for bar, p in zip(bars, ranked):
        ax.text(min(bar.get_width() + 0.01, 0.9), bar.get_y() + bar.get_height() / 2, f"{p.probability:.3f}",
                va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
