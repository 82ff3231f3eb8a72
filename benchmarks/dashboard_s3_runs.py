# nice -n 15 .venv/bin/python benchmarks/dashboard_s3_runs.py  ->  benchmarks/results/dashboard_s3_runs.json and the line `RESULT dashboard_s3_runs: ratio=<one request at a time / 16 in flight> (target 4.0) PASS|FAIL` (200 runs on an S3 API 20 ms away: seconds of a dashboard's first listing and of its rescans, S3 requests per listing; about 3 minutes on 2 cores)
"""Listing a runs folder on S3: the dashboard's scan against the same scan one request at a time.

200 run folders (10 sweeps of 15 runs and 50 single runs, each with spec.yaml and run.json, a 40-line
metrics.jsonl, summary.json for most, a checkpoint folder and Ray's folder) are uploaded to moto_server. Between the
dashboard and moto sits a loopback proxy that holds every request for `--rtt-ms` (20 ms: a client in the
same region as its bucket sees 10-50 ms per S3 request) and counts requests. Timed, interleaved:
  sequential: the scan as the dashboard did it before, one request in flight, each file read as
              open() (an object-details request) then read() (a GET);
  parallel:   the dashboard now: up to 16 requests in flight, each file one ranged GET.
Cold: the first scan of a fresh index (every file read); rescan: a second scan (every folder listed again,
only changed files read: none). Both scans must produce the same rows.
"""
from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from clipforge.runtime.environment import apply_defaults, apply_entry_point_defaults

from bench_report import result_line, write_report
from dashboard_list_runs import write_folder
from s3_server import KEY_ID, REGION, SECRET, new_bucket, s3fs_for, start_moto, stop

apply_entry_point_defaults()  # offline model hubs, local Ray settings, as the command line sets them
apply_defaults({"NO_ALBUMENTATIONS_UPDATE": "1"})  # img2dataset's albumentations: no update check

RESULTS = REPO / "benchmarks" / "results" / "dashboard_s3_runs.json"
TARGET_SPEEDUP = 4.0


class DelayProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to `upstream` after `delay_s`, counting requests (HTTP/1.1 keep-alive both ways)."""

    daemon_threads = True

    def __init__(self, upstream: str, delay_s: float):
        self.upstream = upstream.split("//", 1)[1]
        self.delay_s = delay_s
        self.count = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        server: DelayProxy = self.server
        with server.lock:
            server.count += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(server.delay_s)
        conn = getattr(self, "_upstream", None) or http.client.HTTPConnection(server.upstream, timeout=60)
        self._upstream = conn
        conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # noqa: N815 - the names http.server dispatches to

    def log_message(self, *args) -> None:
        pass


def sequential_tree(url: str):
    """The S3 tree as the dashboard read it before: one request at a time, open() then read() per file."""
    from clipforge.dashboard.tree import FsspecTree

    class OneAtATime(FsspecTree):
        parallel_requests = 1

        def read_bytes(self, rel: str, start: int = 0, size: int = -1) -> bytes:
            with self.fs.open(self._abs(rel), "rb") as f:
                if start:
                    f.seek(start)
                return f.read()

    return OneAtATime(url)


def scan(tree_factory, spec, proxy: DelayProxy) -> dict:
    from clipforge.dashboard.runs import RunIndex

    tree = tree_factory(spec.runs)
    tree.fs.invalidate_cache()
    index = RunIndex(tree, spec)
    out = {}
    for phase in ("cold", "rescan"):
        before = proxy.count
        t = time.perf_counter()
        rows, _ = index.scan(0)
        out[phase] = {"seconds": time.perf_counter() - t, "requests": proxy.count - before}
    out["rows"] = sorted((r["id"], r["step"], r["loss"], json.dumps(r["evals"], sort_keys=True)) for r in rows)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--lines", type=int, default=40, help="metrics.jsonl lines per run")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="time the proxy holds each request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    from clipforge.dashboard.spec import DashboardSpec
    from clipforge.dashboard.tree import FsspecTree

    moto, endpoint = start_moto()
    proxy = DelayProxy(endpoint, args.rtt_ms / 1000)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    started = time.perf_counter()
    try:
        bucket = new_bucket(endpoint)
        with tempfile.TemporaryDirectory(prefix="dashboard-s3-bench-") as tmp:
            root = Path(tmp) / "runs"
            ids = write_folder(root, args.runs, sweeps=10, per_sweep=15, lines=args.lines)
            s3fs_for(endpoint).put(f"{root}/", f"{bucket}/runs", recursive=True)
        # The dashboard finds S3 through the environment, as `clipforge dashboard --runs s3://...` does.
        os.environ.update(AWS_ENDPOINT_URL=proxy.url, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET,
                          AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true")
        spec = DashboardSpec(runs=f"s3://{bucket}/runs", port=0, estimate_compute=False, rescan_interval_s=0)
        ways = {"sequential": sequential_tree, "parallel": FsspecTree}
        results: dict[str, list[dict]] = {name: [] for name in ways}
        load_before = round(os.getloadavg()[0], 2)
        for rep in range(args.repeats):
            for name in (list(ways) if rep % 2 == 0 else list(ways)[::-1]):
                results[name].append(scan(ways[name], spec, proxy))
                r = results[name][-1]
                print(f"  {name:<10} cold {r['cold']['seconds']:.2f} s ({r['cold']['requests']} requests), "
                      f"rescan {r['rescan']['seconds']:.2f} s ({r['rescan']['requests']} requests)", flush=True)
        if any(r["rows"] != results["sequential"][0]["rows"] for rs in results.values() for r in rs):
            raise RuntimeError("the two scans listed different rows")
        if len(results["parallel"][0]["rows"]) != len(ids):
            raise RuntimeError(f"listed {len(results['parallel'][0]['rows'])} runs, expected {len(ids)}")
    finally:
        proxy.shutdown()
        stop(moto)

    def med(name: str, phase: str, key: str) -> float:
        return statistics.median(r[phase][key] for r in results[name])

    medians = {name: {f"{phase}_{key}": round(med(name, phase, key), 3) for phase in ("cold", "rescan")
                      for key in ("seconds", "requests")} for name in results}
    speedup = medians["sequential"]["cold_seconds"] / medians["parallel"]["cold_seconds"]
    report = {
        "command": f"nice -n {os.nice(0)} .venv/bin/python benchmarks/dashboard_s3_runs.py {' '.join(sys.argv[1:])}",
        "runs": len(ids), "metrics_lines_per_run": args.lines, "rtt_ms": args.rtt_ms, "repeats": args.repeats,
        "medians": medians,
        "rescan_speedup": round(medians["sequential"]["rescan_seconds"] / medians["parallel"]["rescan_seconds"], 2),
        "runs_detail": {name: [{k: v for k, v in r.items() if k != "rows"} for r in rs] for name, rs in results.items()},
        "ratio": round(speedup, 3), "target": TARGET_SPEEDUP, "pass": speedup >= TARGET_SPEEDUP,
        "benchmark_seconds": round(time.perf_counter() - started, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1min_before": load_before, "loadavg_1min_after": round(os.getloadavg()[0], 2)},
    }
    out = write_report(args.out, report)
    for name, m in medians.items():
        print(f"{name:<10} median cold {m['cold_seconds']:.2f} s ({m['cold_requests']:.0f} requests), "
              f"rescan {m['rescan_seconds']:.2f} s ({m['rescan_requests']:.0f} requests)")
    print(f"wrote {out}")
    print(result_line("dashboard_s3_runs", speedup, TARGET_SPEEDUP, speedup >= TARGET_SPEEDUP))
    return 0


if __name__ == "__main__":
    sys.exit(main())
