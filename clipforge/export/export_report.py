"""`clipforge export-report`: fp32 PyTorch vs fp32 ONNX vs int8 ONNX, side by side.

For one checkpoint: file size, latency at each batch size (image + text tower, median of interleaved
repeats, all on the CPU with the same thread count) and zero-shot accuracy on an image folder
(the demo's Fashion-MNIST task). Written as export_report.json and export_report.md.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path

from clipforge.export.errors import ExportError
from clipforge.runtime.output_folder import OutputOwner, claim_output_folder

log = logging.getLogger(__name__)

VARIANTS = {"fp32_torch": "fp32 PyTorch", "fp32_onnx": "fp32 ONNX", "int8_onnx": "int8 ONNX"}
REFERENCE = "fp32_torch"
REPORT_JSON, REPORT_MD = "export_report.json", "export_report.md"
LATENCY_IMAGES = 32


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _file_size(path: str) -> int:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return int(fs.size(p))


def _sizes(checkpoint_dir: str, export_dir: Path, manifest) -> dict[str, int]:
    from clipforge.models.checkpoint_files import MODEL_FILE

    def onnx_size(precision: str) -> int:
        return sum((export_dir / tower.files[precision]).stat().st_size for tower in (manifest.image, manifest.text))

    return {"fp32_torch": _file_size(f"{checkpoint_dir.rstrip('/')}/{MODEL_FILE}"),
            "fp32_onnx": onnx_size("fp32"), "int8_onnx": onnx_size("int8")}


def _speedups(latency: dict, batch_sizes) -> dict[str, dict[str, float]]:
    """Reference latency / variant latency per batch size (total of both towers), and their geometric mean."""
    out = {}
    for name, per_batch in latency.items():
        ratios = {f"batch_{b}": latency[REFERENCE][f"batch_{b}"]["total_ms"] / per_batch[f"batch_{b}"]["total_ms"]
                  for b in batch_sizes}
        ratios["geomean"] = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
        out[name] = {k: round(v, 3) for k, v in ratios.items()}
    return out


def run_export_report(checkpoint: str, fashion_dir: str | Path, out: str | Path, classnames: list[str] | None = None,
                      model_name: str | None = None, templates: str = "fashion_mnist", per_class: int | None = None,
                      repeats: int = 5, threads: int = 1, batch_sizes: tuple[int, ...] = (1, 32)) -> dict:
    """Export `checkpoint` (fp32 + int8) under OUT/onnx, measure the three variants, write OUT/export_report.*."""
    import torch

    from clipforge.eval.templates import get_templates
    from clipforge.export.exporter import export_checkpoint
    from clipforge.export.latency import measure
    from clipforge.export.onnx_runtime import OnnxClip
    from clipforge.export.torch_backend import TorchClip, load_checkpoint_model
    from clipforge.export.zeroshot import class_prompts, load_folder, zeroshot_logits, zeroshot_scores
    from clipforge.models.checkpoint_files import resolve_checkpoint

    if threads < 1:
        raise ExportError(f"threads must be >= 1, got {threads}")
    if repeats < 1:
        raise ExportError(f"repeats must be >= 1, got {repeats}")
    try:
        prompt_templates = get_templates(templates)
    except ValueError as e:
        raise ExportError(str(e)) from None
    out = Path(out)
    data = load_folder(str(fashion_dir), classnames, per_class)
    resolve_checkpoint(checkpoint)  # a missing checkpoint fails before the output folder is made
    claim_output_folder(str(out), OutputOwner("export-report", "export-report", "--out",
                                              own_names=("onnx", REPORT_JSON, REPORT_MD), signature=(REPORT_JSON,)))
    torch.set_num_threads(threads)

    exported = export_checkpoint(checkpoint, out / "onnx", model_name=model_name, int8=True)
    manifest = exported.manifest
    bundle, checkpoint_dir, _ = load_checkpoint_model(checkpoint, model_name)
    torch_fp32 = TorchClip(bundle, device="cpu")
    onnx_fp32 = OnnxClip(exported.directory, "fp32", device="cpu", threads=threads)
    backends: dict[str, TorchClip | OnnxClip] = {
        "fp32_torch": torch_fp32,
        "fp32_onnx": onnx_fp32,
        "int8_onnx": OnnxClip(exported.directory, "int8", device="cpu", threads=threads),
    }

    t0 = time.time()
    sample = data.images[:LATENCY_IMAGES]
    pixels = onnx_fp32.preprocess(sample)
    prompts = [p for c in data.classnames for p in class_prompts(c, prompt_templates)]
    tokens = onnx_fp32.tokenizer(prompts[:LATENCY_IMAGES])
    latency = measure(backends, pixels, tokens, batch_sizes=batch_sizes, repeats=repeats)
    log.info("latency measured in %.1f s", time.time() - t0)

    t0 = time.time()
    logits = {name: zeroshot_logits(backend, data, prompt_templates) for name, backend in backends.items()}
    log.info("zero-shot evaluation of %d images x %d variants in %.1f s", len(data.images), len(backends),
             time.time() - t0)
    reference_pred = logits[REFERENCE].argmax(axis=1)

    sizes = _sizes(checkpoint_dir, exported.directory, manifest)
    speedups = _speedups(latency, batch_sizes)
    variants = {}
    for name, label in VARIANTS.items():
        variants[name] = {
            "label": label,
            "size_bytes": sizes[name],
            "size_ratio": round(sizes[name] / sizes[REFERENCE], 4),
            "latency": latency[name],
            "speedup": speedups[name],
            "zeroshot": zeroshot_scores(logits[name], data.labels),
            "top1_agreement": float((logits[name].argmax(axis=1) == reference_pred).mean()),
        }
    report = {
        "model_name": manifest.model_name,
        "checkpoint": checkpoint_dir,
        "export_dir": str(exported.directory),
        "machine": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": threads, "device": "cpu"},
        "latency_protocol": {"batch_sizes": list(batch_sizes), "repeats": repeats, "statistic": "median",
                             "interleaved": True, "timed": "image tower + text tower on preprocessed inputs"},
        "zeroshot_task": {"folder": str(fashion_dir), "images": len(data.images), "classes": data.classnames,
                          "templates": templates if isinstance(templates, str) else "custom",
                          "per_class": per_class},
        "quantization": {"image": manifest.image.quantization, "text": manifest.text.quantization},
        "verification": manifest.verification,
        "variants": variants,
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / REPORT_MD).write_text(format_markdown(report), encoding="utf-8")
    return report


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def format_markdown(report: dict) -> str:
    batch_sizes = report["latency_protocol"]["batch_sizes"]
    head = ["variant", "size (MB)", "size / fp32 PyTorch"]
    head += [f"batch {b} (ms)" for b in batch_sizes]
    head += ["speed-up (geomean)", "zero-shot acc@1", "mean per-class recall", "top-1 = fp32 PyTorch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report["variants"].values():
        row = [v["label"], _mb(v["size_bytes"]), f"{v['size_ratio']:.3f}"]
        row += [f"{v['latency'][f'batch_{b}']['total_ms']:.1f}" for b in batch_sizes]
        row += [f"{v['speedup']['geomean']:.2f}x", f"{v['zeroshot']['acc1']:.3f}",
                f"{v['zeroshot']['mean_per_class_recall']:.3f}", f"{v['top1_agreement']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    per_tower = ["", "Per tower (ms, median): " + "; ".join(
        f"{v['label']}: " + ", ".join(f"batch {b} image {v['latency'][f'batch_{b}']['image_ms']:.1f} / text "
                                      f"{v['latency'][f'batch_{b}']['text_ms']:.1f}" for b in batch_sizes)
        for v in report["variants"].values())]
    fp32 = report["verification"].get("fp32", {})
    int8 = report["verification"].get("int8", {})
    task, machine, proto = report["zeroshot_task"], report["machine"], report["latency_protocol"]
    notes = [
        "",
        f"- Model `{report['model_name']}`, checkpoint `{report['checkpoint']}`.",
        f"- CPU: {machine['cpu']} ({machine['cpu_count']} cores), {machine['threads']} thread(s) for PyTorch and "
        f"onnxruntime alike.",
        f"- Latency: {proto['timed']}; median of {proto['repeats']} interleaved repeats; speed-up = fp32 PyTorch "
        "latency / variant latency, geometric mean over the batch sizes.",
        f"- Zero-shot: {task['images']} images, {len(task['classes'])} classes, templates `{task['templates']}` "
        "(prompt ensembling as in `clipforge eval`).",
        f"- int8: image tower: {report['quantization']['image']}; text tower: {report['quantization']['text']}.",
    ]
    if fp32:
        notes.append(f"- Export check (fp32 ONNX vs PyTorch): image max |diff| "
                     f"{fp32['image_pipeline']['max_abs_diff']:.2e}, text max |diff| "
                     f"{fp32['text_graph']['max_abs_diff']:.2e}, token ids identical: {fp32['tokens_identical']}.")
    if int8:
        notes.append(f"- int8 vs PyTorch embeddings: image mean cosine {int8['image_pipeline']['mean_cosine']:.4f}, "
                     f"text mean cosine {int8['text_graph']['mean_cosine']:.4f}.")
    title = [f"# Export report: {report['model_name']}", ""]
    return "\n".join(title + lines + per_tower + notes) + "\n"


def summary_numbers(report: dict) -> dict[str, float]:
    """The two headline ratios of the int8 export: its size and its speed relative to fp32 PyTorch."""
    int8 = report["variants"]["int8_onnx"]
    return {"size_ratio": int8["size_ratio"], "speedup": int8["speedup"]["geomean"],
            "acc1_drop": report["variants"][REFERENCE]["zeroshot"]["acc1"] - int8["zeroshot"]["acc1"]}
