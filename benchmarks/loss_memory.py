# nice -n 15 .venv/bin/python benchmarks/loss_memory.py  ->  benchmarks/results/loss_memory.json and the lines `RESULT loss_memory: ...` and `RESULT loss_time: ...` (open_clip ClipLoss vs TiledClipLoss, global batch 16,384, dim 512, fp32, forward + backward on CPU; a few minutes single-threaded)
"""Peak memory and time of the contrastive loss: open_clip's ClipLoss (full B x B logits) vs TiledClipLoss.

Every measurement runs in a fresh child process so that one run's allocator state cannot hide
another's peak. A child builds the features (seeded, identical for both losses), warms the kernels up
on a small batch, resets the kernel's peak-RSS counter, runs forward + backward once and reports
    peak RSS during forward + backward - RSS before it,
which is what the loss itself needs on top of its inputs (logits, softmaxes, feature gradients).
Runs alternate between the two losses and are repeated; medians are reported. One extra run of each
at B/4 and B/2 gives the memory's scaling, from which the largest batch that fits a 24 GiB device is
extrapolated (quadratic fit for ClipLoss, linear for the tiled loss); nothing that large is allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_report import result_line, write_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "loss_memory.json"
DEVICE_BYTES = 24 * 2**30
MEMORY_TARGET = 0.125
TIME_TARGET = 1.25


# --------------------------------------------------------------------------------------------- child side

def _rss_kib() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _open_clip_loss_module():
    """open_clip's loss.py alone: importing the package would pull timm and transformers into the child."""
    import importlib.util

    package = Path(next(iter(importlib.util.find_spec("open_clip").submodule_search_locations)))
    spec = importlib.util.spec_from_file_location("open_clip_loss", package / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_loss(kind: str, tile: int):
    if kind == "open_clip":
        return _open_clip_loss_module().ClipLoss()
    from clipforge.models.losses_tiled import TiledClipLoss

    return TiledClipLoss(tile_size=tile)


def _features(batch: int, dim: int, seed: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(batch, dim, generator=g), dim=-1)
    return img.requires_grad_(True), txt.requires_grad_(True), torch.tensor(1 / 0.07, requires_grad=True)


def child(kind: str, batch: int, dim: int, tile: int, seed: int, threads: int, save: str | None) -> dict:
    import gc

    import torch

    torch.set_num_threads(threads)
    loss_fn = _make_loss(kind, tile)
    warm = _features(256, dim, seed + 1)
    loss_fn(*warm).backward()
    img, txt, scale = _features(batch, dim, seed)
    del warm
    gc.collect()
    rss_before, _ = _rss_kib()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    loss = loss_fn(img, txt, scale)
    loss.backward()
    seconds = time.perf_counter() - t0
    _, peak = _rss_kib()
    if save:
        torch.save({"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}, save)
    return {"kind": kind, "batch": batch, "seconds": seconds, "peak_delta_bytes": (peak - rss_before) * 1024,
            "peak_counter_reset": reset, "threads": torch.get_num_threads(), "loss": float(loss)}


# -------------------------------------------------------------------------------------------- parent side

def _run_child(kind: str, batch: int, args: argparse.Namespace, save: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--batch", str(batch), "--dim",
           str(args.dim), "--tile", str(args.tile), "--seed", str(args.seed), "--threads", str(args.threads)]
    if save:
        cmd += ["--save", save]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {kind} B={batch} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind:9s} B={batch:6d}  {result['seconds']:8.2f} s  peak +{result['peak_delta_bytes'] / 2**20:9.1f} MiB",
          flush=True)
    return result


def _max_differences(a_path: str, b_path: str) -> dict:
    import torch

    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    out = {}
    for key in ("loss", "img", "txt", "scale"):
        diff = (a[key] - b[key]).abs().max().item()
        out[key] = {"max_abs_diff": diff, "max_rel_diff": diff / max(b[key].abs().max().item(), 1e-30)}
    return out


def _largest_batch(points: list[tuple[int, int]], dim: int, quadratic: bool) -> int:
    """Largest B whose inputs (2 x B x dim fp32) plus fitted loss memory fit in DEVICE_BYTES."""
    import numpy as np

    bs = np.array([p[0] for p in points], dtype=float)
    mem = np.array([p[1] for p in points], dtype=float)
    cols = [np.ones_like(bs), bs] + ([bs**2] if quadratic else [])
    coef, *_ = np.linalg.lstsq(np.stack(cols, axis=1), mem, rcond=None)
    c0, c1 = coef[0], coef[1] + 2 * dim * 4
    c2 = coef[2] if quadratic else 0.0
    if c2 > 0:
        return int((-c1 + np.sqrt(c1**2 - 4 * c2 * (c0 - DEVICE_BYTES))) / (2 * c2))
    return int((DEVICE_BYTES - c0) / c1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tile", type=int, default=None, help="TiledClipLoss tile size (default: LossSpec's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run; 1 keeps timings meaningful on a small machine shared with other work, "
                   "where multi-threaded runs mostly measure the other load")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", choices=("open_clip", "tiled"), help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tile is None:
        from clipforge.models.spec import LossSpec

        args.tile = LossSpec().tile_size
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.dim, args.tile, args.seed, args.threads, args.save)))
        return

    load_start = os.getloadavg()
    print(f"loss memory/time: B={args.batch}, dim={args.dim}, fp32, tile={args.tile}, {args.repeats} runs each")
    runs: dict[str, list[dict]] = {"open_clip": [], "tiled": []}
    with tempfile.TemporaryDirectory() as tmp:
        saved = {k: os.path.join(tmp, f"{k}.pt") for k in runs}
        for i in range(args.repeats):
            for kind in ("open_clip", "tiled") if i % 2 == 0 else ("tiled", "open_clip"):
                runs[kind].append(_run_child(kind, args.batch, args, saved[kind] if i == 0 else None))
        differences = _max_differences(saved["tiled"], saved["open_clip"])
    scaling = {k: [] for k in runs}
    for batch in (args.batch // 4, args.batch // 2):
        for kind in runs:
            scaling[kind].append(_run_child(kind, batch, args))

    summary: dict = {}
    for kind, rs in runs.items():
        points = [(r["batch"], r["peak_delta_bytes"]) for r in scaling[kind] + rs]
        summary[kind] = {
            "median_seconds": statistics.median(r["seconds"] for r in rs),
            "median_peak_delta_bytes": statistics.median(r["peak_delta_bytes"] for r in rs),
            "seconds": [r["seconds"] for r in rs],
            "peak_delta_bytes": [r["peak_delta_bytes"] for r in rs],
            "scaling_points": points,
            "largest_batch_in_24GiB": _largest_batch(points, args.dim, quadratic=kind == "open_clip"),
        }
    memory_ratio = summary["tiled"]["median_peak_delta_bytes"] / summary["open_clip"]["median_peak_delta_bytes"]
    time_ratio = summary["tiled"]["median_seconds"] / summary["open_clip"]["median_seconds"]
    report = {
        "config": {"batch": args.batch, "dim": args.dim, "dtype": "float32", "tile_size": args.tile,
                   "repeats": args.repeats, "device": "cpu", "threads": runs["tiled"][0]["threads"],
                   "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                   "load_average_start": load_start, "load_average_end": os.getloadavg(),
                   "memory_measure": "peak RSS during forward+backward minus RSS before, fresh process per run"},
        "open_clip_ClipLoss": summary["open_clip"],
        "TiledClipLoss": summary["tiled"],
        "differences_tiled_vs_open_clip": differences,
        "memory_ratio": memory_ratio,
        "memory_target": MEMORY_TARGET,
        "memory_pass": memory_ratio <= MEMORY_TARGET,
        "time_ratio": time_ratio,
        "time_target": TIME_TARGET,
        "time_pass": time_ratio <= TIME_TARGET,
    }
    out = write_report(args.out, report)
    print(f"max |diff| tiled vs open_clip: loss {differences['loss']['max_abs_diff']:.3g}, "
          f"image grads {differences['img']['max_abs_diff']:.3g}, text grads {differences['txt']['max_abs_diff']:.3g}, "
          f"scale grad {differences['scale']['max_abs_diff']:.3g}")
    print(f"largest batch in 24 GiB: open_clip {summary['open_clip']['largest_batch_in_24GiB']}, "
          f"tiled {summary['tiled']['largest_batch_in_24GiB']}  ->  {out}")
    print(result_line("loss_memory", memory_ratio, MEMORY_TARGET, report["memory_pass"]))
    print(result_line("loss_time", time_ratio, TIME_TARGET, report["time_pass"]))


if __name__ == "__main__":
    main()
