"""Running an export directory with onnxruntime: images and captions in, normalised embeddings out.

Needs onnxruntime, numpy, Pillow and tokenizers only; PyTorch is never imported on this path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipforge.export.errors import ExportError
from clipforge.export.manifest import PRECISIONS, ExportManifest, read_manifest
from clipforge.export.preprocess import batch as preprocess_batch
from clipforge.export.text import CaptionTokenizer


def pick_providers(requested: str = "auto") -> list[str]:
    """onnxruntime execution providers: CUDA first when this onnxruntime build has it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    if requested == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ExportError(f"CUDA was asked for but this onnxruntime offers only {', '.join(available)} "
                              "(install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if requested != "auto":
        raise ExportError(f"device {requested!r} is not one of auto, cpu, cuda for ONNX exports")
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return preferred + ["CPUExecutionProvider"]


def open_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 config: dict[str, str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for unreadable graphs
        raise ExportError(f"cannot load ONNX graph {path}: {e}") from None


class OnnxClip:
    """The image and text graphs of one precision of an export, with their preprocessing and tokenizer."""

    def __init__(self, directory: str | Path, precision: str = "fp32", device: str = "auto",
                 threads: int | None = None, manifest: ExportManifest | None = None):
        self.directory = Path(directory)
        # The exporter passes the manifest it is about to write, to verify the graphs before accepting them.
        self.manifest: ExportManifest = manifest or read_manifest(self.directory)
        if precision not in PRECISIONS:
            raise ExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        m = self.manifest
        for tower in (m.image, m.text):
            if precision not in tower.files:
                raise ExportError(f"{self.directory} has no {precision} graphs (it holds: "
                                  f"{', '.join(sorted(tower.files))}); export with --int8 to add them")
        self.precision = precision
        providers = pick_providers(device)
        self.image_session = open_session(self.directory / m.image.files[precision], providers, threads,
                                          m.session_config)
        self.text_session = open_session(self.directory / m.text.files[precision], providers, threads,
                                         m.session_config)
        self.tokenizer = CaptionTokenizer(m.tokenizer, self.directory)
        self.logit_scale = m.logit_scale
        self.logit_bias = m.logit_bias

    @property
    def providers(self) -> list[str]:
        return self.image_session.get_providers()

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] preprocessed images -> [N, D] normalised embeddings."""
        return self.image_session.run([self.manifest.image.output],
                                      {self.manifest.image.input: np.ascontiguousarray(pixels, np.float32)})[0]

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """int64 [N, context_length] token ids -> [N, D] normalised embeddings."""
        return self.text_session.run([self.manifest.text.output],
                                     {self.manifest.text.input: np.ascontiguousarray(tokens, np.int64)})[0]

    def preprocess(self, images: list) -> np.ndarray:
        return preprocess_batch(images, self.manifest.preprocess)

    def encode_images(self, images: list, batch_size: int = 32) -> np.ndarray:
        """PIL images -> [N, D] normalised embeddings."""
        out = [self.embed_pixels(self.preprocess(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(out)

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Captions -> [N, D] normalised embeddings."""
        out = [self.embed_tokens(self.tokenizer(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out)
