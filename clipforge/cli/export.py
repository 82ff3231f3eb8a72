"""Deployment commands of the `clipforge` CLI.

  clipforge export CHECKPOINT --out DIR [--model NAME] [--format onnx] [--int8]
  clipforge predict --model CHECKPOINT_OR_ONNX_DIR IMAGE "caption a" "caption b" ... [--plot out.png]
  clipforge export-report --checkpoint CKPT --fashion-dir DIR --out DIR [--classnames a,b,...]

`predict` on an ONNX export imports neither PyTorch nor open_clip, so it runs where only
onnxruntime, numpy, Pillow and tokenizers are installed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def _split_names(values: list[str] | None) -> list[str] | None:
    """`--classnames a,b --classnames c` -> [a, b, c] (names themselves may contain spaces)."""
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def export(
    checkpoint: str = typer.Argument(..., help="Checkpoint or training run directory (then its latest checkpoint)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the graphs, tokenizer and export.json."),
    model: Optional[str] = typer.Option(None, "--model", help="Architecture name; default: the one in meta.json."),
    fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    int8: bool = typer.Option(False, "--int8", help="Also write int8-quantized graphs."),
    opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
    tolerance: float = typer.Option(1e-4, help="Largest accepted |ONNX - PyTorch| of fp32 embeddings."),
    sample_images: Optional[Path] = typer.Option(None, help="Folder of extra images for the export check."),
) -> None:
    """Export a checkpoint's image and text towers as ONNX graphs (L2-normalised embeddings) and check them."""
    from clipforge.export.exporter import export_checkpoint

    result = export_checkpoint(checkpoint, out, model_name=model, fmt=fmt, int8=int8, opset=opset,
                               tolerance=tolerance, sample_images=sample_images)
    m = result.manifest
    fp32 = m.verification["fp32"]
    typer.echo(f"exported {m.model_name} to {result.directory} in {result.seconds:.1f} s")
    typer.echo(f"  fp32 check: image max |diff| {fp32['image_pipeline']['max_abs_diff']:.2e}, "
               f"text max |diff| {fp32['text_graph']['max_abs_diff']:.2e} (tolerance {tolerance:g})")
    if "int8" in m.verification:
        q = m.verification["int8"]
        typer.echo(f"  int8: image mean cosine {q['image_pipeline']['mean_cosine']:.4f}, "
                   f"text mean cosine {q['text_graph']['mean_cosine']:.4f} to PyTorch fp32")


def predict(
    image: Path = typer.Argument(..., help="Image file."),
    captions: List[str] = typer.Argument(..., help="Candidate captions."),
    model: str = typer.Option(..., "--model", help="ONNX export directory, checkpoint or run directory."),
    plot: Optional[Path] = typer.Option(None, help="Also draw the probabilities as a bar chart (PNG)."),
    precision: str = typer.Option("auto", help="ONNX exports: auto (int8 if exported), fp32 or int8."),
    device: str = typer.Option("auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps."),
    arch: Optional[str] = typer.Option(None, help="Checkpoints only: architecture, if meta.json lacks it."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Probability of each caption for an image."""
    from clipforge.export.predict import describe, format_table, load_backend, plot_predictions
    from clipforge.export.predict import predict as run_predict
    from clipforge.export.preprocess import load_image

    img = load_image(image)
    backend = load_backend(model, precision=precision, device=device, arch=arch)
    predictions = run_predict(backend, img, captions)
    if as_json:
        typer.echo(json.dumps({"model": str(model), "backend": describe(backend), "image": str(image),
                               "predictions": [p.__dict__ for p in predictions]}, indent=2))
    else:
        typer.echo(f"{image} -- {model} ({describe(backend)})")
        typer.echo(format_table(predictions))
    if plot is not None:
        path = plot_predictions(predictions, plot, f"{Path(image).name} ({describe(backend)})")
        typer.echo(f"plot: {path}", err=as_json)


def export_report(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint or training run directory."),
    fashion_dir: Path = typer.Option(..., "--fashion-dir", help="Image folder with one sub-folder per class."),
    out: Path = typer.Option(..., "--out", help="Output folder (export, export_report.json/.md)."),
    classnames: Optional[List[str]] = typer.Option(
        None, "--classnames", help="Prompt names in class-folder order, comma-separated or repeated; default: "
        "the folder names."),
    model: Optional[str] = typer.Option(None, "--model", help="Architecture name; default: the one in meta.json."),
    templates: str = typer.Option("fashion_mnist", help="Zero-shot template set or .json file."),
    per_class: Optional[int] = typer.Option(None, help="Use at most this many images per class."),
    repeats: int = typer.Option(5, help="Timed repeats per variant and batch size."),
    threads: int = typer.Option(1, help="CPU threads for PyTorch and onnxruntime alike."),
) -> None:
    """Size, latency and zero-shot accuracy of fp32 PyTorch, fp32 ONNX and int8 ONNX, as Markdown and JSON."""
    from clipforge.export.export_report import REPORT_JSON, REPORT_MD, format_markdown, run_export_report

    report = run_export_report(checkpoint, fashion_dir, out, classnames=_split_names(classnames),
                               model_name=model, templates=templates, per_class=per_class, repeats=repeats,
                               threads=threads)
    typer.echo(format_markdown(report))
    typer.echo(f"report: {Path(out) / REPORT_MD}, {Path(out) / REPORT_JSON}")


def register(app: typer.Typer) -> None:
    """Add `export`, `predict` and `export-report` to the clipforge CLI."""
    app.command("export")(export)
    app.command("predict")(predict)
    app.command("export-report")(export_report)
