# nice -n 15 .venv/bin/python benchmarks/export_report.py  ->  benchmarks/results/export_report.{json,md} and the lines `RESULT export_int8: ratio=<int8 size / fp32 torch size> (target 0.333) PASS|FAIL` and `RESULT export_int8_speed: ratio=<fp32 torch latency / int8 latency> (target 1.3) PASS|FAIL` (the demo's miniclip-effnet-minilm: fp32 PyTorch vs fp32 ONNX vs int8 ONNX on the CPU, 1 thread, Fashion-MNIST zero-shot; a few minutes on 2 cores)
"""Export report of the demo model, with the two int8 targets checked.

Checkpoint: the demo's trained run (runs/demo/train) when `make demo` has produced one, else the
untrained model (pretrained trunks, random heads) saved as a checkpoint; its zero-shot accuracy is
then near chance, but sizes, latencies and the int8/fp32 agreement are measured all the same.
Fashion-MNIST images: the demo's own folder if present, else prepared from the cached Debian packages.
Speed ratio: fp32 PyTorch latency / int8 ONNX latency (image + text tower), geometric mean over
batch 1 and batch 32, each the median of interleaved repeats.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipforge.runtime.environment import apply_defaults, apply_entry_point_defaults

apply_entry_point_defaults()  # offline model hubs, local Ray settings, as the command line sets them
apply_defaults({"NO_ALBUMENTATIONS_UPDATE": "1"})  # img2dataset's albumentations: no update check

MODEL = "miniclip-effnet-minilm"
SIZE_TARGET = 0.333
SPEED_TARGET = 1.3
RESULTS = REPO / "benchmarks" / "results"


def demo_checkpoint(work: Path) -> tuple[str, str]:
    """(checkpoint path, where it came from)."""
    from clipforge.models import ModelSpec, create_model, find_latest_checkpoint, load_meta, save_checkpoint

    trained = find_latest_checkpoint(str(REPO / "runs" / "demo" / "train"))
    if trained and load_meta(trained).get("model_name") == MODEL:
        return trained, "trained demo run (runs/demo/train)"
    path = work / "untrained-checkpoint"
    bundle = create_model(ModelSpec(name=MODEL))
    save_checkpoint(str(path), bundle.model.state_dict(), {"model_name": MODEL, "step": 0})
    return str(path), "untrained model (no trained demo run found; zero-shot accuracy is near chance)"


def fashion_folder(work: Path, per_class: int) -> Path:
    demo = REPO / "runs" / "demo" / "data" / "fashion"
    if demo.is_dir():
        return demo
    from clipforge.demo.offline_data import prepare_demo_data

    data = prepare_demo_data(REPO / "data" / "cache", work / "data", max_train=200, heldout=40,
                             fashion_per_class=per_class)
    return data.fashion_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20, help="Fashion-MNIST images per class (10 classes).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "export-report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from clipforge.demo.data_fashion import PROMPT_NAMES
    from clipforge.export.export_report import (
        REPORT_JSON,
        REPORT_MD,
        format_markdown,
        run_export_report,
        summary_numbers,
    )

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, source = demo_checkpoint(args.work)
    fashion = fashion_folder(args.work, args.per_class)
    report = run_export_report(checkpoint, fashion, args.work, classnames=list(PROMPT_NAMES),
                               per_class=args.per_class, repeats=args.repeats, threads=args.threads)
    numbers = summary_numbers(report)
    size_ok = numbers["size_ratio"] <= SIZE_TARGET
    speed_ok = numbers["speedup"] >= SPEED_TARGET
    report["benchmark"] = {
        "checkpoint_source": source,
        "targets": {"size_ratio_max": SIZE_TARGET, "speedup_min": SPEED_TARGET},
        "size_ratio": numbers["size_ratio"], "speedup": numbers["speedup"],
        "int8_acc1_drop": numbers["acc1_drop"],
        "pass": {"size": size_ok, "speed": speed_ok},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = format_markdown(report) + (
        f"- Checkpoint: {source}.\n"
        f"- Targets: int8 size <= {SIZE_TARGET} x fp32 PyTorch ({'PASS' if size_ok else 'FAIL'}: "
        f"{numbers['size_ratio']:.3f}); int8 speed-up >= {SPEED_TARGET}x ({'PASS' if speed_ok else 'FAIL'}: "
        f"{numbers['speedup']:.2f}x).\n")
    (RESULTS / REPORT_MD).write_text(md, encoding="utf-8")
    shutil.copyfile(RESULTS / REPORT_MD, args.work / REPORT_MD)
    print(md)
    print(f"RESULT export_int8: ratio={numbers['size_ratio']:.3f} (target {SIZE_TARGET}) "
          f"{'PASS' if size_ok else 'FAIL'}")
    print(f"RESULT export_int8_speed: ratio={numbers['speedup']:.2f} (target {SPEED_TARGET}) "
          f"{'PASS' if speed_ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
