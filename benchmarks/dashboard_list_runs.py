# nice -n 15 .venv/bin/python benchmarks/dashboard_list_runs.py  ->  benchmarks/results/dashboard_list_runs.json and the line `RESULT dashboard_list_runs: ratio=<seconds/1.0> (target 1.0) PASS|FAIL` (3,000 run folders listed through GET /api/runs, median wall time of a freshly started dashboard's first request; about a minute on 2 cores, most of it writing the folders and building the model once)
"""Time to list thousands of runs through the dashboard's HTTP API.

Writes 3,000 run folders the way the trainer does (spec.yaml and its index run.json, a 40-line metrics.jsonl
with eval lines, summary.json for most, a checkpoint's meta.json, Ray's folder), 30 sweeps of 95 runs plus 150
single runs, then times `GET /api/runs` on a real server over loopback (`--without-index`: the folders as runs
written before run.json existed have them, spec.yaml only, whose head the dashboard reads instead):
  cold: the first request of a freshly started dashboard (no run read yet), repeated with new servers;
  warm: later requests of one dashboard, each rescanning the whole folder (rescan_interval_s=0) and
        reading only what changed.
The per-model compute estimate (building the model once, in the background) is done before timing
and shared, as it is in a dashboard that has been up for a minute. The result is the median cold wall
time; CPU seconds are recorded beside it, since wall time on a shared machine also measures the load.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipforge.runtime.environment import apply_defaults, apply_entry_point_defaults

apply_entry_point_defaults()  # offline model hubs, local Ray settings, as the command line sets them
apply_defaults({"NO_ALBUMENTATIONS_UPDATE": "1"})  # img2dataset's albumentations: no update check

RESULTS = REPO / "benchmarks" / "results" / "dashboard_list_runs.json"
TARGET_SECONDS = 1.0


def write_folder(root: Path, runs: int, sweeps: int, per_sweep: int, lines: int, index: bool = True) -> list[str]:
    from clipforge.runtime.run_dir import SPEC_FILE, dump_spec, write_spec_files
    from clipforge.train.spec import TrainSpec

    template = TrainSpec.model_validate({"kind": "train", "name": "x", "storage": "x", "model": {"name": "tiny"},
                                         "data": {"shards": ["/data/shards/train"], "batch_size": 256}})
    ids = [f"sweep{s:02d}/run{r:03d}" for s in range(sweeps) for r in range(per_sweep)]
    ids += [f"single{i:04d}" for i in range(runs - len(ids))]
    t0 = 1.79e9
    for n, rel in enumerate(ids):
        run = root / rel
        (run / "checkpoints" / "epoch_0001").mkdir(parents=True)
        (run / "ray").mkdir()
        spec = template.model_copy(update={"name": rel.replace("/", "-"), "storage": str(run)})
        if index:
            write_spec_files(str(run), spec)
        else:
            (run / SPEC_FILE).write_text(dump_spec(spec))
        records = []
        for i in range(1, lines + 1):
            rec = {"epoch": 1 + i // 10, "logit_scale": 14.2 + 0.01 * i, "loss": 5.0 / (1 + 0.01 * i * (1 + n % 7)),
                   "lr": 1e-3, "samples_per_second": 900.0 + n % 50, "samples_seen": i * 2560, "step": i * 10,
                   "step_time": 0.28, "time": t0 + i * 3}
            if i % 10 == 0:
                rec.update({"eval/fashion_mnist/acc1": 0.1 + 0.002 * i, "eval/fashion_mnist/n_images": 1000})
            records.append(json.dumps(rec, sort_keys=True))
        (run / "metrics.jsonl").write_text("\n".join(records) + "\n")
        if n % 5:
            (run / "summary.json").write_text(json.dumps({"steps": lines * 10, "samples_seen": lines * 2560,
                                                          "samples_per_second": 910.0, "wall_seconds": lines * 3.0}))
        (run / "checkpoints" / "epoch_0001" / "meta.json").write_text(json.dumps({"step": lines * 10, "epoch": 1}))
    (root / "sweep00" / "sweep.json").write_text(json.dumps({"fields": ["optim.lr"], "children": []}))
    return ids


def get_runs(url: str) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds of this process, runs listed, response bytes) of one GET /api/runs.

    The server runs in this process, so the CPU time is the server's work (plus the client's few
    milliseconds of socket reads): unlike wall time, it does not grow with other programs' load.
    """
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    t0, c0 = time.perf_counter(), time.process_time()
    conn.request("GET", "/api/runs")
    resp = conn.getresponse()
    body = resp.read()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET /api/runs answered {resp.status}: {body[:300]!r}")
    return seconds, cpu, len(json.loads(body)["runs"]), len(body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3000)
    p.add_argument("--lines", type=int, default=40, help="metrics.jsonl lines per run")
    p.add_argument("--cold-repeats", type=int, default=5)
    p.add_argument("--warm-repeats", type=int, default=5)
    p.add_argument("--without-index", action="store_true",
                   help="write spec.yaml only, as runs written before run.json existed have it")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from clipforge.dashboard.app import Dashboard
    from clipforge.dashboard.model_cost import ModelCosts
    from clipforge.dashboard.server import start_in_thread
    from clipforge.dashboard.spec import DashboardSpec

    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        root = Path(tmp) / "runs"
        t = time.perf_counter()
        ids = write_folder(root, args.runs, sweeps=30, per_sweep=min(95, args.runs // 31), lines=args.lines,
                           index=not args.without_index)
        write_seconds = time.perf_counter() - t
        print(f"wrote {len(ids)} run folders in {write_seconds:.1f} s", flush=True)

        costs = ModelCosts(enabled=True)
        costs.get("tiny")
        t = time.perf_counter()
        if not costs.wait(600):
            raise RuntimeError("the model cost estimate did not finish in 10 minutes")
        estimate_seconds = time.perf_counter() - t
        print(f"model cost estimate (once per model, in the background): {estimate_seconds:.1f} s", flush=True)

        spec = DashboardSpec(runs=str(root), port=0, rescan_interval_s=0)
        load_before = round(os.getloadavg()[0], 2)
        cold, warm, cold_cpu, warm_cpu, sizes = [], [], [], [], []
        for _ in range(args.cold_repeats):
            server, thread = start_in_thread(spec, Dashboard(spec, costs=costs))
            try:
                seconds, cpu, n, size = get_runs(server.url)
                if n != len(ids):
                    raise RuntimeError(f"listed {n} runs, expected {len(ids)}")
                cold.append(seconds)
                cold_cpu.append(cpu)
                sizes.append(size)
                if not warm:
                    for _ in range(args.warm_repeats):
                        seconds, cpu, _, _ = get_runs(server.url)
                        warm.append(seconds)
                        warm_cpu.append(cpu)
            finally:
                server.shutdown()
                server.server_close()
                thread.join(5)
        median_cold = statistics.median(cold)
        report = {
            "runs": len(ids),
            "run_index": not args.without_index,
            "metrics_lines_per_run": args.lines,
            "cold_seconds": [round(s, 4) for s in cold],
            "warm_seconds": [round(s, 4) for s in warm],
            "median_cold_seconds": round(median_cold, 4),
            "median_warm_seconds": round(statistics.median(warm), 4),
            "cold_cpu_seconds": [round(s, 4) for s in cold_cpu],
            "warm_cpu_seconds": [round(s, 4) for s in warm_cpu],
            "median_cold_cpu_seconds": round(statistics.median(cold_cpu), 4),
            "median_warm_cpu_seconds": round(statistics.median(warm_cpu), 4),
            "response_bytes": sizes[0],
            "target_seconds": TARGET_SECONDS,
            "ratio": round(median_cold / TARGET_SECONDS, 4),
            "pass": median_cold <= TARGET_SECONDS,
            "write_seconds": round(write_seconds, 1),
            "model_estimate_seconds": round(estimate_seconds, 1),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_1min_before": load_before, "loadavg_1min_after": round(os.getloadavg()[0], 2)},
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    verdict = "PASS" if report["pass"] else "FAIL"
    print(f"RESULT dashboard_list_runs: ratio={report['ratio']:.4f} (target 1.0) {verdict}")


if __name__ == "__main__":
    main()
