# nice -n 15 .venv/bin/python benchmarks/train_throughput.py  ->  benchmarks/results/train_throughput.json and the line `RESULT train_throughput: ratio=...` (steady-state training samples/s of clipforge on Ray Train over open_clip's own trainer under torchrun: same model config, shards, global batch, 2 processes x 1 core, interleaved, medians); about 8 minutes on 2 quiet cores (15-17 under shared load) once open_clip's venv exists (its first creation, .cache/openclip-train-venv, adds a few minutes and ~6 GB)
"""Training throughput: clipforge's trainer against open_clip's own trainer (`open_clip_train`).

Both train the same architecture from scratch: clipforge's `miniclip-vit-scratch` config (open_clip ViT,
128 px, patch 16, 4 x 256 wide; text transformer 4 x 256, context 64; open_clip's BPE tokenizer), copied
without its clipforge section into a folder that open_clip registers (`open_clip.add_model_config`)
and that clipforge reads as a JSON path, so both build the very same `open_clip.model.CLIP`.
Same data: 4 WebDataset shards of 1,000 real demo images (clip art, emoji, Tux Paint stamps), resized
by clipforge's builder code (256 px, white border, JPEG q95), written once under --work.
Same run: all parameters train, fp32, global batch 64 (32 per process), 2 processes with 1 torch
thread each on the 2 cores, gloo, 1 DataLoader process each, the same shuffle buffer start (1,000 raw
samples), OpenCLIP's clip loss with local loss and gradient-carrying gathers, AdamW with the same
hyper-parameters, a metrics line every step, no evaluation, one checkpoint at the end.
    open_clip   `torchrun --standalone --nproc_per_node 2 benchmarks/openclip_train_entry.py ...`
                (`open_clip_train.main`; its venv needs webdataset<=0.2.86, so it lives apart, in
                .cache/openclip-train-venv, created on first use and reused after)
    clipforge   `clipforge.train.trainer.run_train` (Ray Train, scaling.workers 2 x 1 CPU) on a Ray
                started once by this script, as in the demo and on a cluster
Steady state: the first --warmup steps (model build, loader start-up, first allocations) are
dropped and the next --steps are measured from each trainer's own per-step timings: open_clip's
`Batch (t)` of every `Train Epoch` line (each step's wall time, data wait included), clipforge's
`step_time` of every metrics.jsonl line (likewise). The same window is also timed from the two
logs' timestamps (wall clock over the window, whatever happens between steps) and whole-run wall
times are recorded. Runs alternate (the order flips every repetition); medians are compared.
Both trainers' processes run at this script's niceness (Ray's own default would start its workers 15
steps nicer, which on a shared machine hands open_clip most of the CPU).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from clipforge.runtime.environment import apply_defaults, apply_entry_point_defaults

apply_entry_point_defaults()  # offline model hubs, local Ray settings, as the command line sets them
apply_defaults({"NO_ALBUMENTATIONS_UPDATE": "1"})  # img2dataset's albumentations: no update check

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import result_line, write_report

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "train_throughput.json"
ENTRY = REPO / "benchmarks" / "openclip_train_entry.py"
OPENCLIP_VENV = REPO / ".cache" / "openclip-train-venv"
# open_clip_train's webdataset pipeline needs webdataset<=0.2.86; the torch build is clipforge's own.
OPENCLIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "open_clip_torch[training]", "webdataset<=0.2.86"]
SOURCE_MODEL = "miniclip-vit-scratch"
BENCH_MODEL = "bench-miniclip-vit-scratch"
TARGET = 1.0
RAY_NICENESS_VARIABLE = "RAY_worker_niceness"
SHUFFLE_START = 1000  # open_clip_train's _SAMPLE_SHUFFLE_INITIAL: raw samples held before the first leaves
HYPER = {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 10, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "seed": 0}


# ---- open_clip's venv --------------------------------------------------------------------------------------

def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_openclip_venv(venv: Path) -> Path:
    """The venv's python, creating the venv and installing open_clip's trainer into it when missing."""
    stamp = venv / "clipforge-bench-requirements.json"
    python = _venv_python(venv)
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == OPENCLIP_REQUIREMENTS:
        return python
    print(f"creating open_clip's training venv in {venv} (once; a few minutes)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log_path = venv / "pip-install.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([str(python), "-m", "pip", "install", *OPENCLIP_REQUIREMENTS], stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"installing {' '.join(OPENCLIP_REQUIREMENTS)} into {venv} failed (log {log_path}):\n{tail}")
    stamp.write_text(json.dumps(OPENCLIP_REQUIREMENTS))
    return python


def openclip_versions(python: Path) -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('open_clip_torch', 'webdataset', 'torch', 'torchvision', 'timm')}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def clipforge_versions() -> dict:
    import importlib.metadata as m

    return {p: m.version(p) for p in ("open_clip_torch", "webdataset", "torch", "torchvision", "ray")}


# ---- the shared model config and shards --------------------------------------------------------------------

def write_model_config(work: Path) -> Path:
    """clipforge's config as plain open_clip JSON, in a folder of its own (open_clip registers every JSON there)."""
    from clipforge.models.registry import CLIPFORGE_SECTION, CONFIG_DIR

    cfg = json.loads((CONFIG_DIR / f"{SOURCE_MODEL}.json").read_text())
    cfg.pop(CLIPFORGE_SECTION, None)
    folder = work / "train-throughput-model"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{BENCH_MODEL}.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def bench_shards(work: Path, shards: int, per_shard: int) -> list[Path]:
    """`shards` tars of `per_shard` demo image-caption pairs, resized and encoded as clipforge's builder does."""
    import pandas as pd
    import webdataset as wds

    from clipforge.demo.offline_data import prepare_demo_data
    from clipforge.pipeline.imaging import ImageRejected, process_image
    from clipforge.pipeline.spec import FilterSpec, ResizeSpec

    out = work / f"train-shards-{shards}x{per_shard}"
    params = {"shards": shards, "per_shard": per_shard, "resize": 256, "mode": "border", "format": "jpg",
              "quality": 95}
    paths = [out / f"{i:05d}.tar" for i in range(shards)]
    done = out / "shards.json"
    if done.exists() and json.loads(done.read_text()) == params and all(p.exists() for p in paths):
        return paths
    needed = shards * per_shard
    # The same prepared demo images as benchmarks/build_throughput.py (reused when that ran first).
    data = prepare_demo_data(cache_dir=REPO / "data" / "cache", out_dir=work / "demo-5000", max_train=5000, heldout=0,
                             fashion_per_class=0)
    rows = pd.read_parquet(data.train_list)
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written, writer = 0, None
    for path, caption in zip(rows["path"], rows["caption"]):
        if written == needed:
            break
        try:
            image = process_image((data.images_dir / path).read_bytes(), ResizeSpec(size=256, mode="border"),
                                  FilterSpec(), 89_478_485, "jpg", 95)
        except ImageRejected:
            continue
        if written % per_shard == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(tmp / paths[written // per_shard].name))
        writer.write({"__key__": f"{written:09d}", "jpg": image.data, "txt": caption})
        written += 1
    if writer is not None:
        writer.close()
    if written < needed:
        raise SystemExit(f"only {written} usable demo images for {needed} training samples; lower --shards or "
                         "--per-shard")
    tmp.rename(out)
    done.write_text(json.dumps(params))
    return paths


# ---- the two trainers --------------------------------------------------------------------------------------

_OPENCLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+).* Loss: ([\d.]+)")


def parse_openclip_steps(steps_path: Path, global_batch: int) -> list[dict]:
    """Per-step records from open_clip's `Train Epoch` lines (one per step with --log-every-n-steps 1)."""
    records = []
    for line in steps_path.read_text().splitlines():
        entry = json.loads(line)
        m = _OPENCLIP_LINE.search(entry["message"])
        if not m:
            raise ValueError(f"{steps_path}: unexpected open_clip log line {entry['message']!r}")
        records.append({"step": int(m.group(1)) // global_batch, "time": entry["time"],
                        "data_wait": float(m.group(2)), "step_time": float(m.group(3)), "loss": float(m.group(4))})
    return records


def run_openclip(python: Path, run_dir: Path, shards: list[Path], model_cfg: Path, plan: dict) -> dict:
    workers, global_batch, steps = plan["workers"], plan["global_batch"], plan["total_steps"]
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    steps_path = run_dir / "steps.jsonl"
    names = ",".join(p.stem for p in shards)
    pattern = f"{shards[0].parent}/{{{names}}}.tar"
    argv = ["--model", BENCH_MODEL, "--train-data", pattern, "--dataset-type", "webdataset",
            # Exactly `steps` global batches (open_clip rounds the sample count up to whole batches).
            "--train-num-samples", str(steps * global_batch), "--batch-size", str(global_batch // workers),
            "--epochs", "1", "--workers", str(plan["loader_workers"]), "--precision", "fp32",
            "--local-loss", "--gather-with-grad", "--dist-backend", "gloo", "--device", "cpu",
            "--lr", str(HYPER["lr"]), "--wd", str(HYPER["weight_decay"]), "--warmup", str(HYPER["warmup_steps"]),
            "--beta1", str(HYPER["beta1"]), "--beta2", str(HYPER["beta2"]), "--eps", str(HYPER["eps"]),
            "--seed", str(HYPER["seed"]), "--log-every-n-steps", "1", "--save-frequency", "1",
            "--logs", str(run_dir / "logs"), "--name", "run"]
    args_path = run_dir / "open_clip_args.json"
    args_path.write_text(json.dumps(argv))
    cmd = [str(python.parent / "torchrun"), "--standalone", "--nnodes", "1", "--nproc_per_node", str(workers),
           str(ENTRY), str(model_cfg.parent), str(steps_path), str(args_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(plan["threads"]), PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    with open(run_dir / "output.log", "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (run_dir / "output.log").read_text()[-4000:]
        raise RuntimeError(f"open_clip_train failed (exit {proc.returncode}); log {run_dir / 'output.log'}:\n{tail}")
    return {"command": cmd, "open_clip_args": argv, "wall_s": wall,
            "steps": parse_openclip_steps(steps_path, global_batch)}


def clipforge_spec(run_dir: Path, shards: list[Path], model_cfg: Path, plan: dict):
    from clipforge.train.spec import TrainSpec

    raw = {
        "kind": "train", "name": "train-throughput", "storage": str(run_dir),
        "model": {"name": str(model_cfg), "trainable": "all", "init_seed": HYPER["seed"]},
        "data": {"shards": [str(p) for p in shards], "batch_size": plan["global_batch"],
                 "loader_workers": plan["loader_workers"], "shuffle_buffer": SHUFFLE_START},
        "optim": {"lr": HYPER["lr"], "weight_decay": HYPER["weight_decay"], "warmup_steps": HYPER["warmup_steps"],
                  "beta1": HYPER["beta1"], "beta2": HYPER["beta2"], "eps": HYPER["eps"],
                  "steps": plan["total_steps"]},
        "loss": {"kind": "clip", "local_loss": True, "gather_with_grad": True},
        "precision": "fp32",
        "strategy": "ddp",
        "checkpoint": {"every_epochs": 1, "keep_last": 1},
        "tensorboard": False,
        "log_every_steps": 1,
        "seed": HYPER["seed"],
        "scaling": {"workers": plan["workers"], "cpus_per_worker": plan["threads"]},
    }
    return TrainSpec.model_validate(raw)


def run_clipforge(run_dir: Path, shards: list[Path], model_cfg: Path, plan: dict) -> dict:
    from clipforge.train.trainer import run_train

    shutil.rmtree(run_dir, ignore_errors=True)
    spec = clipforge_spec(run_dir, shards, model_cfg, plan)
    t = time.perf_counter()
    summary = run_train(spec, progress=False)
    wall = time.perf_counter() - t
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        records.append({"step": m["step"], "time": m["time"], "step_time": m["step_time"],
                        "data_wait": m.get("data_wait"), "loss": m["loss"]})
    return {"spec": spec.model_dump(mode="json"), "wall_s": wall, "steps": records,
            "summary_samples_per_second": summary["samples_per_second"]}


def steady_state(records: list[dict], warmup: int, steps: int, global_batch: int) -> dict:
    """Samples/s over steps warmup+1 .. warmup+steps: from the per-step times, and from the log timestamps."""
    by_step = {r["step"]: r for r in records}
    window = [by_step.get(s) for s in range(warmup + 1, warmup + steps + 1)]
    if any(r is None for r in window) or warmup not in by_step:
        have = sorted(by_step)
        raise RuntimeError(f"steps {warmup}..{warmup + steps} expected in the trainer's log, got {have[:3]}..{have[-3:]}")
    step_seconds = sum(r["step_time"] for r in window)
    clock_seconds = window[-1]["time"] - by_step[warmup]["time"]
    return {"samples_per_second": steps * global_batch / step_seconds,
            "samples_per_second_log_clock": steps * global_batch / clock_seconds,
            "median_step_time": statistics.median(r["step_time"] for r in window),
            # Time a step waited for its batch (open_clip: rank 0's `Data (t)`; clipforge: the mean over ranks).
            "median_data_wait": statistics.median(r["data_wait"] for r in window),
            "step_seconds": step_seconds, "clock_seconds": clock_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each trainer.")
    parser.add_argument("--warmup", type=int, default=5, help="First steps of each run left out of the measure.")
    parser.add_argument("--steps", type=int, default=25, help="Steps measured after the warm-up.")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="Training processes (each with 1 torch thread).")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes per training process.")
    parser.add_argument("--shards", type=int, default=4, help="Training shards (a multiple of --workers).")
    parser.add_argument("--per-shard", type=int, default=1000, help="Samples per shard.")
    parser.add_argument("--venv", type=Path, default=OPENCLIP_VENV, help="open_clip's training venv.")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench", help="Data and scratch folder.")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.global_batch % args.workers or args.shards % args.workers:
        raise SystemExit(f"--global-batch ({args.global_batch}) and --shards ({args.shards}) must be multiples of "
                         f"--workers ({args.workers})")
    local_samples = args.shards // args.workers * args.per_shard
    total_steps = args.warmup + args.steps
    if total_steps * args.global_batch // args.workers > local_samples:
        raise SystemExit(f"{total_steps} steps of {args.global_batch} need more than the {local_samples} samples "
                         "each process owns; add --shards or --per-shard")
    cores = os.cpu_count() or 1
    started = time.perf_counter()
    load_before = os.getloadavg()

    python = ensure_openclip_venv(args.venv)
    versions = {"open_clip_train_venv": openclip_versions(python), "clipforge_venv": clipforge_versions()}
    model_cfg = write_model_config(args.work)
    shards = bench_shards(args.work, args.shards, args.per_shard)
    plan = {"workers": args.workers, "threads": 1, "loader_workers": args.loader_workers,
            "global_batch": args.global_batch, "total_steps": total_steps}
    print(f"{len(shards)} shards x {args.per_shard} samples; {total_steps} steps of {args.global_batch} per run, "
          f"steps {args.warmup + 1}..{total_steps} measured", flush=True)

    import ray

    t0 = time.perf_counter()
    # Ray starts its workers `worker_niceness` (15) steps nicer than the driver; open_clip's processes keep
    # this script's niceness. On a machine shared with other jobs that alone would give open_clip several
    # times clipforge's CPU share, so Ray's workers keep the driver's niceness here, like open_clip's.
    os.environ[RAY_NICENESS_VARIABLE] = "0"
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    scratch = args.work / "train-throughput-runs"
    trainers = {
        "clipforge": lambda rep: run_clipforge(scratch / f"clipforge-{rep}", shards, model_cfg, plan),
        "open_clip": lambda rep: run_openclip(python, scratch / f"open_clip-{rep}", shards, model_cfg, plan),
    }
    runs: dict[str, list[dict]] = {name: [] for name in trainers}
    order = list(trainers)
    try:
        for rep in range(args.repeats):
            for name in order if rep % 2 == 0 else order[::-1]:
                run = trainers[name](rep)
                run.update(steady_state(run["steps"], args.warmup, args.steps, args.global_batch))
                runs[name].append(run)
                print(f"  {name:<10} run {rep + 1}: {run['samples_per_second']:.1f} samples/s steady "
                      f"(log clock {run['samples_per_second_log_clock']:.1f}; median step "
                      f"{run['median_step_time']:.3f} s, of it data wait {run['median_data_wait']:.3f} s), "
                      f"whole run {run['wall_s']:.1f} s", flush=True)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    med = {name: {"samples_per_second": round(median(name, "samples_per_second"), 2),
                  "samples_per_second_log_clock": round(median(name, "samples_per_second_log_clock"), 2),
                  "median_step_time": round(median(name, "median_step_time"), 4),
                  "median_data_wait": round(median(name, "median_data_wait"), 4),
                  "wall_s": round(median(name, "wall_s"), 1)} for name in runs}
    ratio = med["clipforge"]["samples_per_second"] / med["open_clip"]["samples_per_second"]
    clock_ratio = med["clipforge"]["samples_per_second_log_clock"] / med["open_clip"]["samples_per_second_log_clock"]
    report = {
        "command": " ".join([f"nice -n {os.nice(0)}", ".venv/bin/python benchmarks/train_throughput.py",
                             *sys.argv[1:]]),
        "model": {"source_config": f"clipforge/models/configs/{SOURCE_MODEL}.json", "registered_as": BENCH_MODEL,
                  "config": json.loads(model_cfg.read_text())},
        "data": {"shards": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in shards],
                 "samples_per_shard": args.per_shard, "image": "256 px white-bordered JPEG q95, trained at 128 px"},
        "settings": {**plan, "warmup_steps_dropped": args.warmup, "measured_steps": args.steps,
                     "precision": "fp32", "loss": "clip, local loss, gather with grad", "hyper": HYPER,
                     "shuffle_start": SHUFFLE_START, "dist_backend": "gloo", "ray_start_seconds": round(ray_start_s, 2),
                     "niceness": {"script": os.nice(0), "open_clip_processes": "the script's",
                                  "ray_workers": f"the script's ({RAY_NICENESS_VARIABLE}=0)"}},
        "versions": versions,
        "machine": {"cpu_count": cores, "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in load_after]},
        "medians": med,
        "ratio_clipforge_over_open_clip": round(ratio, 4),
        "ratio_log_clock": round(clock_ratio, 4),
        "target_ratio": TARGET,
        "pass": ratio >= TARGET,
        "runs": {name: [{k: v for k, v in r.items() if k not in ("spec",)} for r in rs] for name, rs in runs.items()},
        "clipforge_spec": runs["clipforge"][0]["spec"] if runs["clipforge"] else None,
        "benchmark_seconds": round(time.perf_counter() - started, 1),
    }
    out = write_report(args.out, report)
    for name in runs:
        print(f"{name:<10} median {med[name]['samples_per_second']:.1f} samples/s (log clock "
              f"{med[name]['samples_per_second_log_clock']:.1f}), median whole run {med[name]['wall_s']:.1f} s")
    print(f"wrote {out} ({report['benchmark_seconds']:.0f} s)")
    print(result_line("train_throughput", ratio, TARGET, ratio >= TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
