"""`export.json`: what an export directory holds and how to feed its graphs.

Written last by the exporter, so a directory with a readable export.json is a complete export.
Read by the ONNX runtime side, which must not need PyTorch: this module depends on pydantic only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, ValidationError

from clipforge.export.errors import ExportError
from clipforge.specbase import Spec

MANIFEST_FILE = "export.json"
FORMAT: Final = "clipforge-onnx"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "int8")


class ImagePreprocess(Spec):
    """open_clip's evaluation transform: resize, centre crop (or pad), RGB, scale to [0, 1], normalise."""

    size: tuple[int, int] = Field(..., description="(height, width) fed to the image graph.")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    fill_color: int = Field(0, description="Padding value for `longest` (letterbox) resizing.")


class TokenizerFiles(Spec):
    kind: Literal["hf", "clip_bpe"] = Field(
        ..., description="`hf`: a Hugging Face tokenizer; `clip_bpe`: open_clip's SimpleTokenizer, rebuilt as a "
        "tokenizers BPE with the same vocabulary and merges.")
    file: str = Field(..., description="tokenizer.json (Hugging Face `tokenizers` format), relative to the export.")
    vocab_file: str | None = Field(None, description="clip_bpe only: the original BPE merges file, for reference.")
    clean: Literal["lower", "whitespace"] = Field(
        ..., description="Text cleaning before tokenization, as open_clip does it: `whitespace` fixes text "
        "(ftfy, HTML entities) and collapses whitespace; `lower` also lower-cases.")
    context_length: int = Field(..., ge=2)
    pad_id: int = Field(..., ge=0)
    pad_token: str


class Tower(Spec):
    files: dict[str, str] = Field(..., description="precision (fp32, int8) -> ONNX file relative to the export.")
    input: str
    output: str
    quantization: str | None = Field(None, description="How the int8 graph was made.")


class ExportManifest(Spec):
    format: Literal["clipforge-onnx"] = FORMAT
    format_version: int = FORMAT_VERSION
    model_name: str
    checkpoint: str | None
    embed_dim: int
    opset: int
    normalized: bool = Field(True, description="Both graphs output L2-normalised embeddings (done inside the graph).")
    logit_scale: float = Field(
        ..., description="exp(model.logit_scale): the multiplier of cosine similarities before the softmax "
        "(1 / temperature).")
    logit_bias: float | None = None
    image: Tower
    text: Tower
    preprocess: ImagePreprocess
    tokenizer: TokenizerFiles
    session_config: dict[str, str] = Field(
        default_factory=dict, description="onnxruntime session config entries the graphs are meant to run with "
        "(SessionOptions.add_session_config_entry); see clipforge.export.quantize.")
    verification: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)


def write_manifest(directory: str | Path, manifest: ExportManifest) -> Path:
    """Write export.json atomically (a half-written file would look like a broken export)."""
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(directory: str | Path) -> ExportManifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{directory} is not a clipforge ONNX export (no {MANIFEST_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ExportError(f"{path} is not a {FORMAT} manifest (format: {found!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {raw.get('format_version')!r} is not supported "
                          f"(this clipforge reads version {FORMAT_VERSION}); export the checkpoint again")
    try:
        return ExportManifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ExportError(f"{path}: field {where}: {first['msg']}") from None
