# Run: nice -n 15 .venv/bin/python benchmarks/build_throughput.py  -> builds the same 5,000-image URL list with img2dataset and with clipforge (interleaved, repeated), prints images/s of each and their ratio, writes benchmarks/results/build_throughput.json
"""Dataset-build throughput: clipforge's builder against plain img2dataset on the same machine and data.

Both download the demo's real images (PNG clip art, emoji and stamps from Debian packages) from a
loopback HTTP server running in its own process, resize them to 256 px with white borders, encode
JPEG q95 and write 500-sample WebDataset shards. img2dataset runs with 2 processes x 32 threads;
clipforge runs `run_build` with 2 workers x 32 threads on a Ray already started (as in the demo and
on a cluster). One untimed warm-up build of each comes first (page cache, imports, Ray workers);
then the timed builds alternate, the order flipping every repetition. Images/s is successful images
over the wall time of the build call; the medians are compared (the RESULT line).

img2dataset starts its process pool inside every call, while the warm clipforge builds reuse Ray's
workers; so clipforge is also timed "cold" at the end: no Ray running, `run_build` starts a private
local Ray and stops it, as `clipforge run spec.yaml` does. Its ratio is reported beside the main one.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from clipforge.runtime.environment import apply_defaults, apply_entry_point_defaults

apply_entry_point_defaults()  # offline model hubs, local Ray settings, as the command line sets them
apply_defaults({"NO_ALBUMENTATIONS_UPDATE": "1"})  # img2dataset's albumentations: no update check

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "build_throughput.json"
TARGET = 0.9
IMAGE_SIZE = 256
SHARD = 500
THREADS = 32
PROCESSES = 2


def _serve(images_dir: str, queue) -> None:
    """Body of the server process: serve `images_dir` until terminated."""
    from clipforge.demo.http_server import serve_directory

    with serve_directory(Path(images_dir)) as base:
        queue.put(base)
        while True:
            time.sleep(3600)


def start_server(images_dir: Path) -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(str(images_dir), queue), daemon=True)
    proc.start()
    return proc, queue.get(timeout=120)


def run_img2dataset(url_list: Path, out: Path) -> tuple[int, float]:
    from img2dataset import download

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    download(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
             output_format="webdataset", output_folder=str(out), processes_count=PROCESSES, thread_count=THREADS,
             image_size=IMAGE_SIZE, resize_mode="border", encode_format="jpg", encode_quality=95,
             number_sample_per_shard=SHARD, timeout=10, retries=0, incremental_mode="incremental",
             enable_wandb=False)
    wall = time.perf_counter() - t0
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return ok, wall


def run_clipforge(url_list: Path, out: Path) -> tuple[int, float]:
    from clipforge.pipeline.build import run_build
    from clipforge.pipeline.spec import BuildSpec

    shutil.rmtree(out, ignore_errors=True)
    spec = BuildSpec.model_validate({
        "kind": "build",
        "name": "bench",
        "input": {"path": str(url_list), "url_col": "url", "caption_col": "caption"},
        "output": {"path": str(out), "samples_per_shard": SHARD, "image_format": "jpg", "quality": 95},
        "download": {"allow_networks": ["127.0.0.0/8"], "threads_per_worker": THREADS, "timeout_s": 10, "retries": 0},
        "resize": {"size": IMAGE_SIZE, "mode": "border"},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    })
    t0 = time.perf_counter()
    stats = run_build(spec, progress=False)
    return stats["ok"], time.perf_counter() - t0


def subset(url_list: Path, n: int, path: Path) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(url_list).slice(0, n), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="Images in the URL list (demo images).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed builds of each tool.")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench", help="Data and scratch folder.")
    parser.add_argument("--result", type=Path, default=RESULT, help="Where to write the JSON result.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from clipforge.demo.offline_data import prepare_demo_data, write_url_list

    cores = os.cpu_count() or 1
    data = prepare_demo_data(cache_dir=REPO / "data" / "cache", out_dir=args.work / f"demo-{args.images}",
                             max_train=args.images, heldout=0, fashion_per_class=0)
    scratch = args.work / "throughput"
    scratch.mkdir(parents=True, exist_ok=True)
    server, base = start_server(data.images_dir)
    load_before = os.getloadavg()
    try:
        url_list = write_url_list(data.train_list, base, scratch / "urls.parquet")
        warm_list = subset(url_list, 300, scratch / "warmup.parquet")

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - t0
        tools = {"img2dataset": run_img2dataset, "clipforge": run_clipforge}
        for name, fn in tools.items():
            fn(warm_list, scratch / f"warmup-{name}")
        runs: dict[str, list[dict]] = {name: [] for name in [*tools, "clipforge_cold"]}

        def timed(name: str, fn, rep: int) -> None:
            ok, wall = fn(url_list, scratch / f"out-{name}")
            runs[name].append({"images_ok": ok, "wall_s": round(wall, 2), "images_per_s": round(ok / wall, 1)})
            print(f"  {name:<15} run {rep + 1}: {ok} images in {wall:.1f} s = {ok / wall:.1f} images/s", flush=True)

        for rep in range(args.repeats):
            for name in (list(tools) if rep % 2 == 0 else list(reversed(tools))):
                timed(name, tools[name], rep)
        ray.shutdown()
        for rep in range(args.repeats):
            timed("clipforge_cold", run_clipforge, rep)
    finally:
        server.terminate()
        server.join(timeout=10)
    load_after = os.getloadavg()

    medians = {name: statistics.median(r["images_per_s"] for r in rs) for name, rs in runs.items()}
    ratio = medians["clipforge"] / medians["img2dataset"]
    cold_ratio = medians["clipforge_cold"] / medians["img2dataset"]
    passed = ratio >= TARGET
    result = {
        "command": "nice -n 15 .venv/bin/python benchmarks/build_throughput.py",
        "images": args.images,
        "settings": {"image_size": IMAGE_SIZE, "resize_mode": "border", "format": "jpg", "quality": 95,
                     "samples_per_shard": SHARD, "img2dataset": {"processes_count": PROCESSES, "thread_count": THREADS},
                     "clipforge": {"workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": THREADS}},
        "machine": {"cpu_count": cores, "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in load_after]},
        "ray_start_seconds": round(ray_start_s, 2),
        "runs": runs,
        "median_images_per_s": {k: round(v, 1) for k, v in medians.items()},
        "median_images_per_s_per_core": {k: round(v / cores, 1) for k, v in medians.items()},
        "ratio_clipforge_over_img2dataset": round(ratio, 3),
        "ratio_clipforge_cold_over_img2dataset": round(cold_ratio, 3),
        "target_ratio": TARGET,
        "pass": passed,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    for name, v in medians.items():
        print(f"{name:<15} median {v:7.1f} images/s  ({v / cores:.1f} per core, {cores} cores)")
    print(f"Ray start-up before the warm runs: {ray_start_s:.1f} s; "
          f"cold clipforge (private Ray started per build) / img2dataset: {cold_ratio:.3f}")
    print(f"RESULT build_throughput: ratio={ratio:.3f} (target {TARGET}) {'PASS' if passed else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
