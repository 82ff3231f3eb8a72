"""`clipforge export`: a checkpoint -> ONNX image and text graphs (+ int8), tokenizer files and export.json.

The fp32 graphs are accepted only if they reproduce the PyTorch model within `tolerance` on the
sample inputs (see clipforge.export.verify); otherwise the export fails and no export.json is
written, so a half-good directory is never mistaken for an export. int8 graphs are compared with
the PyTorch model the same way and the agreement is recorded, not enforced: quantization error is
expected and its effect is measured by `clipforge export-report`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.export.errors import ExportError, ExportVerificationError
from clipforge.export.manifest import MANIFEST_FILE, ExportManifest, ImagePreprocess, Tower, write_manifest
from clipforge.runtime.output_folder import OutputOwner, claim_output_folder

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
DEFAULT_TOLERANCE = 1e-4
# Below this cosine to fp32 an int8 graph is likely to change rankings; exports still succeed but say so.
INT8_COSINE_WARNING = 0.95
SAMPLE_FOLDER_LIMIT = 16


@dataclass
class ExportResult:
    directory: Path
    manifest: ExportManifest
    seconds: float


def preprocess_config(bundle) -> ImagePreprocess:
    """The evaluation transform of `bundle` as data: built like clipforge.models.factory builds it
    (config's clipforge.preprocess over open_clip's defaults); the verification step checks it against
    the bundle's actual transform."""
    from open_clip.transform import PreprocessCfg

    pre = dict(bundle.config.get("clipforge", {}).get("preprocess", {}))
    pre.pop("train_scale", None)
    size = bundle.model.visual.image_size
    cfg = PreprocessCfg(size=size, **pre)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return ImagePreprocess(size=(int(height), int(width)), mean=tuple(cfg.mean), std=tuple(cfg.std),
                           interpolation=cfg.interpolation, resize_mode=cfg.resize_mode, fill_color=cfg.fill_color)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import open_clip

    import clipforge

    return {"clipforge": clipforge.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _samples(sample_images: str | Path | None):
    from clipforge.export.verify import SAMPLE_CAPTIONS, folder_images, synthetic_images

    images = synthetic_images()
    if sample_images:
        images += folder_images(sample_images, SAMPLE_FOLDER_LIMIT)
    return images, list(SAMPLE_CAPTIONS)


# What an export writes: graphs, export.json, tokenizer files (Hugging Face's save_pretrained or a CLIP BPE).
EXPORT_ENTRIES = ("*.onnx", "*.json", "*.txt", "*.model", "merges*")


def export_checkpoint(checkpoint: str, out: str | Path, model_name: str | None = None, fmt: str = "onnx",
                      int8: bool = False, opset: int = 17, tolerance: float = DEFAULT_TOLERANCE,
                      sample_images: str | Path | None = None) -> ExportResult:
    """Export `checkpoint` (a checkpoint or run directory) into `out`; see the module docstring."""
    from clipforge.export.onnx_runtime import OnnxClip
    from clipforge.export.quantize import SESSION_CONFIG, quantize_graph
    from clipforge.export.tokenizer_export import save_tokenizer
    from clipforge.export.torch_backend import TorchClip, load_checkpoint_model
    from clipforge.export.torch_graphs import (
        IMAGE_INPUT,
        IMAGE_OUTPUT,
        TEXT_INPUT,
        TEXT_OUTPUT,
        ImageEncoder,
        TextEncoder,
        export_graph,
    )
    from clipforge.export.verify import compare_backends, failures

    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not supported; choose one of: {', '.join(FORMATS)}")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: the graphs need ONNX opset 17 or newer")
    if not tolerance > 0:
        raise ExportError(f"tolerance must be positive, got {tolerance}")
    t0 = time.time()
    out = Path(out)
    bundle, directory, _ = load_checkpoint_model(checkpoint, model_name)
    claim_output_folder(str(out), OutputOwner("export", "export", "--out", own_names=EXPORT_ENTRIES,
                                              signature=(MANIFEST_FILE,)))
    # A previous export in the same folder stops being valid as soon as its files are overwritten.
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    model = bundle.model
    images, captions = _samples(sample_images)
    torch_clip = TorchClip(bundle, device="cpu")

    example_pixels = torch.from_numpy(torch_clip.preprocess(images[:2]))
    example_tokens = torch.from_numpy(torch_clip.tokenize(captions[:2]))
    export_graph(ImageEncoder(model), example_pixels, out / "image.onnx", IMAGE_INPUT, IMAGE_OUTPUT, opset)
    export_graph(TextEncoder(model), example_tokens, out / "text.onnx", TEXT_INPUT, TEXT_OUTPUT, opset)
    log.info("exported fp32 graphs of %s to %s (%.1f s)", bundle.name, out, time.time() - t0)

    tokenizer = save_tokenizer(bundle.tokenizer, out)
    bias = getattr(model, "logit_bias", None)
    image = Tower(files={"fp32": "image.onnx"}, input=IMAGE_INPUT, output=IMAGE_OUTPUT)
    text = Tower(files={"fp32": "text.onnx"}, input=TEXT_INPUT, output=TEXT_OUTPUT)
    manifest = ExportManifest(
        model_name=bundle.name, checkpoint=str(directory),
        embed_dim=int(torch_clip.embed_tokens(example_tokens.numpy()).shape[1]),
        opset=opset, logit_scale=torch_clip.logit_scale,
        logit_bias=float(bias.item()) if isinstance(bias, torch.Tensor) else None,
        image=image, text=text, preprocess=preprocess_config(bundle), tokenizer=tokenizer,
        versions=_versions(),
    )

    fp32 = compare_backends(torch_clip, OnnxClip(out, "fp32", device="cpu", manifest=manifest), images, captions)
    problems = failures(fp32, tolerance)
    if problems:
        raise ExportVerificationError(
            f"the ONNX export of {checkpoint} does not reproduce the PyTorch model within tolerance {tolerance:g}: "
            + "; ".join(problems))
    verification = {"tolerance": tolerance, "fp32": fp32}

    if int8:
        t1 = time.time()
        for tower, name in ((image, "image"), (text, "text")):
            info = quantize_graph(out / f"{name}.onnx", out / f"{name}.int8.onnx")
            tower.files = {**tower.files, "int8": f"{name}.int8.onnx"}
            tower.quantization = info["method"]
        manifest.session_config = dict(SESSION_CONFIG)
        manifest.image, manifest.text = image, text
        q = compare_backends(torch_clip, OnnxClip(out, "int8", device="cpu", manifest=manifest), images, captions)
        verification["int8"] = {k: q[k] for k in ("image_graph", "image_pipeline", "text_graph")}
        worst = min(q["image_pipeline"]["min_cosine"], q["text_graph"]["min_cosine"])
        if worst < INT8_COSINE_WARNING:
            log.warning("int8 embeddings of %s reach a cosine of only %.3f to fp32 on the sample inputs; "
                        "check its accuracy with `clipforge export-report`", checkpoint, worst)
        log.info("int8 graphs written (%.1f s)", time.time() - t1)

    manifest.verification = verification
    write_manifest(out, manifest)
    return ExportResult(directory=out, manifest=manifest, seconds=round(time.time() - t0, 2))
