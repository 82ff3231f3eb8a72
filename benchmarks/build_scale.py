# Run: nice -n 10 .venv/bin/python benchmarks/build_scale.py [--rows 1000000]  -> builds a 10,000-row and a ROWS-row URL list of tiny loopback images (5% failures, 5% exact duplicates, dedup_exact on) with run_build on one warm Ray, the 10,000-row build before and after the big one; prints rows/s of each and their ratio, the driver's and Ray workers' peak RSS, manifest query times; writes benchmarks/results/build_scale.json
"""Dataset-build scaling: does the builder's cost grow linearly with the input?

The same builder (`run_build`, 2 workers x 0.5 CPU, 16 download threads each, 1,000 rows a shard,
32 px border-resized jpg, exact de-duplication on) builds a 10,000-row URL list (the reference) and a
ROWS-row one (default 1,000,000) on one Ray started up front; an untimed warm-up build comes first (Ray
workers, page cache), then the reference runs `--repeats` times before and once after the big build
(median). De-duplication is on because it is the part of a build whose driver holds every row (the
manifest view, `manifest_view.py`); `--no-dedup` builds without it.

Images come from a loopback server in its own process (asyncio, keep-alive): 8 tiny JPEGs, each
answer with bytes of its own appended after the image (so every row has its own content hash);
every 40th row asks for a missing path (404) and every 40th, offset by 20, gets bytes that are no
image, so exactly 5% of the rows fail; every 20th, offset by 10, gets the very bytes of the row before
(5% exact duplicates). The status counts of every build are checked against these.

Criteria (PASS only if all hold):
  - ratio = rows/s of the big build / median rows/s of the reference builds >= 0.9 (rows/s as the
    builder reports it in stats.json: rows over the wall time of the whole `run_build` call);
  - the driver's peak RSS during the big build < 1 GiB. The driver is this process, which calls
    `run_build`; its peak (VmHWM) is reset before each build through /proc/self/clear_refs. The
    shard tasks run in Ray worker processes: their RSS is sampled every second and reported beside
    it, as are Ray's own processes (GCS, raylet, ...);
  - each manifest query on the big build's output (failures by reason; one row by index, for three
    rows) answers in < 1 s either way it may be asked: `clipforge manifest failures|row` as commands
    (a fresh Python each time, so interpreter start and imports included: on a busy machine mostly
    waiting for a core, so their CPU seconds are reported too), or in-process through the README's
    pyarrow snippet (pyarrow already imported). Both are reported, and the answers are checked.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from clipforge.runtime.environment import apply_entry_point_defaults

apply_entry_point_defaults()  # local Ray settings, as the command line sets them

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import result_line, write_report

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "build_scale.json"
REFERENCE_ROWS = 10_000
TARGET = 0.9
DRIVER_RSS_LIMIT = 1 << 30
QUERY_LIMIT_S = 1.0
SHARD = 1000
IMAGE_SIZE = 32
THREADS = 16
WORKERS = 2
CPUS_PER_WORKER = 0.5
WARMUP_SHARDS = 2 * WORKERS + 1  # every task slot (2 per worker) gets a Ray worker process before the timed builds
TINY_IMAGES = 8
FAIL_EVERY = 40  # row % 40 == 0: 404; row % 40 == 20: bad bytes -> 5% of the rows fail
DUPLICATE_EVERY = 20  # row % 20 == 10: the same bytes as the row before -> 5% exact duplicates
SAMPLE_EVERY_S = 1.0
DISCOVER_EVERY = 10  # samples between two searches for Ray's processes
MIB = 1 << 20


# -- the loopback image server ----------------------------------------------------------------------------


def _tiny_jpegs() -> list[bytes]:
    """TINY_IMAGES distinct 24x24 JPEGs (a few hundred bytes each)."""
    import numpy as np
    from PIL import Image

    images = []
    for seed in range(TINY_IMAGES):
        y, x = np.mgrid[0:24, 0:24]
        rgb = np.stack([(x * 10 + seed * 31) % 256, (y * 10 + seed * 67) % 256,
                        ((x // 4 + y // 4) % 2) * 200 + seed * 7], axis=-1).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(out, format="JPEG", quality=90)
        images.append(out.getvalue())
    return images


def _response(status: str, body: bytes, ctype: str) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class _TinyImageProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive GETs: /img/K.jpg?v=V is tiny JPEG K with V appended after its end marker (decoders
    ignore it; the bytes, and so the content hash, differ for every V), /bad/... bytes that are no image, anything
    else 404.

    Request lines are all it reads: the builder sends GETs without bodies. Python's http.server costs
    ~10x more CPU per request, which on 2 cores would be taken from the builder under test.
    """

    def __init__(self, images: dict[bytes, bytes], bad: bytes, missing: bytes):
        self.images = images
        self.bad = bad
        self.missing = missing
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            request_line = self.buffer[: self.buffer.find(b"\r\n")]
            self.buffer = self.buffer[end + 4:]
            parts = request_line.split(b" ")
            path, _, query = (parts[1] if len(parts) > 1 else b"").partition(b"?")
            assert self.transport is not None
            image = self.images.get(path)
            if image is not None:
                body = image + b"\0" + query
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(body), body))
            elif path.startswith(b"/bad/"):
                self.transport.write(self.bad)
            else:
                self.transport.write(self.missing)


def _serve(queue) -> None:
    """Body of the server process: answer on a free loopback port until terminated."""
    images = {f"/img/{k}.jpg".encode(): body for k, body in enumerate(_tiny_jpegs())}
    bad = _response("200 OK", b"these bytes are not an image" * 4, "image/jpeg")
    missing = _response("404 Not Found", b"", "text/plain")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _TinyImageProtocol(images, bad, missing), "127.0.0.1", 0,
                                          backlog=1024)
        queue.put(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        await server.serve_forever()

    asyncio.run(main())


def start_server() -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(queue,), daemon=True)
    proc.start()
    return proc, queue.get(timeout=120)


# -- URL lists ------------------------------------------------------------------------------------------------


def url_for(base: str, row: int) -> str:
    """Row 40k: 404; 40k + 20: bad bytes; 20k + 10: the very bytes of the row before (an exact duplicate);
    any other row: a tiny JPEG with bytes of its own."""
    if row % FAIL_EVERY == 0:
        return f"{base}/missing/{row}.jpg"
    if row % FAIL_EVERY == FAIL_EVERY // 2:
        return f"{base}/bad/{row}.jpg"
    source = row - 1 if row % DUPLICATE_EVERY == DUPLICATE_EVERY // 2 else row
    return f"{base}/img/{source % TINY_IMAGES}.jpg?v={source}"


def expected_counts(rows: int, dedup: bool) -> dict[str, int]:
    """The status counts a build of the first `rows` rows must report."""
    missing = len(range(0, rows, FAIL_EVERY))
    bad = len(range(FAIL_EVERY // 2, rows, FAIL_EVERY))
    duplicates = len(range(DUPLICATE_EVERY // 2, rows, DUPLICATE_EVERY)) if dedup else 0
    counts = {"ok": rows - missing - bad - duplicates, "http_404": missing, "not_an_image": bad}
    return {**counts, "duplicate": duplicates} if dedup else counts


def write_url_list(path: Path, rows: int, base: str, batch: int = 20_000) -> Path:
    """A parquet URL list (url, caption) written in batches, so that this process never holds it whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, batch):
            index = range(start, min(start + batch, rows))
            writer.write_table(pa.table({"url": [url_for(base, r) for r in index],
                                         "caption": [f"tiny test image number {r}" for r in index]}, schema=schema))
    return path


# -- memory and progress sampling --------------------------------------------------------------------------------


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    """This process's resident set size in bytes."""
    rss = _statm_rss("self")
    assert rss is not None
    return rss


def _vm_hwm() -> int:
    """This process's peak RSS since it started or since `_reset_vm_hwm()` (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_vm_hwm() -> bool:
    """Start this process's peak RSS afresh (Linux: 5 -> clear_refs); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _statm_rss(pid: int | str) -> int | None:
    """RSS of a process from /proc/PID/statm (a cheap read), None once it has ended."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class Sampler(threading.Thread):
    """Every second: this process's RSS, the RSS of each Ray worker and of Ray's own processes (all started by
    this process's `ray.init`), and how many shard manifests the running build has committed.

    The sampler runs in the driver it measures, so it must stay cheap: psutil's search for child processes reads
    all of /proc (costly on a machine running much else), so it runs once every DISCOVER_EVERY samples and the
    samples in between read /proc/PID/statm of the processes found.
    """

    def __init__(self, manifest_dir: Path, exclude: set[int], shards: int, print_every_s: float = 60.0):
        super().__init__(name="rss-sampler", daemon=True)
        self.shards = shards
        self.print_every_s = print_every_s
        self.manifest_dir = manifest_dir
        self.exclude = exclude
        self.stop = threading.Event()
        self.t0 = time.perf_counter()
        self.timeline: list[tuple[float, int, int, int, int]] = []  # (s, driver, workers, ray system, shards done)
        self.worker_peak: dict[int, int] = {}
        self.most_workers = 0
        self.ray_pids: dict[int, bool] = {}  # pid -> is a worker
        self._samples = 0

    def _shards_done(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.manifest_dir) if e.name[:1].isdigit() and e.name.endswith(".parquet"))
        except FileNotFoundError:
            return 0

    def _discover(self) -> None:
        import psutil

        found = {}
        for proc in psutil.Process().children(recursive=True):
            if proc.pid in self.exclude:
                continue
            try:
                cmd = proc.cmdline()
            except psutil.Error:  # ended between the listing and the read
                continue
            found[proc.pid] = bool(cmd) and (cmd[0].startswith("ray::") or any("default_worker.py" in c for c in cmd))
        self.ray_pids = found

    def _ray_processes(self) -> tuple[int, int]:
        if self._samples % DISCOVER_EVERY == 0:
            self._discover()
        self._samples += 1
        workers = system = count = 0
        for pid, is_worker in self.ray_pids.items():
            rss = _statm_rss(pid)
            if rss is None:
                continue
            if is_worker:
                workers += rss
                count += 1
                self.worker_peak[pid] = max(self.worker_peak.get(pid, 0), rss)
            else:
                system += rss
        self.most_workers = max(self.most_workers, count)
        return workers, system

    def sample(self) -> None:
        workers, system = self._ray_processes()
        self.timeline.append((time.perf_counter() - self.t0, _rss(), workers, system, self._shards_done()))

    def run(self) -> None:
        printed = 0.0
        while not self.stop.wait(SAMPLE_EVERY_S):
            self.sample()
            t, driver, workers, _, done = self.timeline[-1]
            if t - printed >= self.print_every_s:  # a long build shows in the log that it moves
                printed = t
                print(f"    {t:6.0f} s: {done}/{self.shards} shards, {done / t:.2f} shards/s; driver "
                      f"{driver / MIB:.0f} MiB, Ray workers {workers / MIB:.0f} MiB", flush=True)

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.sample()


def steady_rows_per_s(timeline: list[tuple[float, int, int, int, int]], shards: int, per_shard: int) -> float | None:
    """Rows/s between the samples where 10% and 90% of the shards were committed: the rate without start-up,
    the last tasks' tail and the stats pass."""
    def first_at(fraction: float) -> tuple[float, int] | None:
        return next(((t, done) for t, _, _, _, done in timeline if done >= fraction * shards), None)

    lo, hi = first_at(0.1), first_at(0.9)
    if lo is None or hi is None or hi[1] <= lo[1] or hi[0] <= lo[0]:
        return None
    return (hi[1] - lo[1]) * per_shard / (hi[0] - lo[0])


def _thin(timeline: list, points: int = 120) -> list:
    step = max(1, len(timeline) // points)
    return [[round(v / MIB, 1) if i in (1, 2, 3) else round(v, 1) if i == 0 else v for i, v in enumerate(p)]
            for p in timeline[::step]]


# -- builds ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every build of a run shares."""

    per_shard: int
    dedup: bool
    exclude: set[int]  # processes that are not Ray's (the image server)


def build_spec(url_list: Path, out: Path, setup: Setup):
    from clipforge.pipeline.spec import BuildSpec

    return BuildSpec.model_validate({
        "kind": "build",
        "name": "scale",
        "input": {"path": str(url_list), "url_col": "url", "caption_col": "caption"},
        "output": {"path": str(out), "samples_per_shard": setup.per_shard, "image_format": "jpg", "quality": 90},
        "download": {"allow_networks": ["127.0.0.0/8"], "threads_per_worker": THREADS, "timeout_s": 10, "retries": 0},
        "resize": {"size": IMAGE_SIZE, "mode": "border"},
        "filters": {"dedup_exact": setup.dedup},
        "scaling": {"workers": WORKERS, "cpus_per_worker": CPUS_PER_WORKER},
    })


def run_one(url_list: Path, rows: int, out: Path, setup: Setup) -> dict[str, Any]:
    """One timed build in this process (the driver), with its memory and progress sampled."""
    from clipforge.pipeline.build import run_build

    shutil.rmtree(out, ignore_errors=True)
    spec = build_spec(url_list, out, setup)
    per_shard = setup.per_shard
    rss_before = _rss()
    hwm_reset = _reset_vm_hwm()
    shards = -(-rows // per_shard)
    sampler = Sampler(out / "manifest", setup.exclude, shards)
    sampler.start()
    t0 = time.perf_counter()
    try:
        stats = run_build(spec, progress=False)
    finally:
        wall = time.perf_counter() - t0
        sampler.finish()
    expected = expected_counts(rows, setup.dedup)
    return {
        "rows": rows,
        "shards": stats["shards"],
        "wall_s": round(wall, 2),
        "rows_per_s": stats["rows_per_second"],
        "images_per_s": stats["images_per_second"],
        "rows_per_s_steady_10_to_90pct": round(steady_rows_per_s(sampler.timeline, shards, per_shard) or 0, 1),
        # The post-download filters (reading every manifest, rewriting shards), stats.json: the rest of the call
        # after the sample that first saw every shard's manifest.
        "seconds_after_last_shard": round(wall - next(t for t, _, _, _, done in sampler.timeline if done >= shards), 1),
        "status_counts": stats["status_counts"],
        "status_counts_as_expected": stats["status_counts"] == expected,
        "driver_rss_before_mib": round(rss_before / MIB, 1),
        "driver_peak_rss_mib": round((_vm_hwm() if hwm_reset else max(p[1] for p in sampler.timeline)) / MIB, 1),
        "driver_peak_from": "VmHWM, reset before the build" if hwm_reset else "samples every second",
        "driver_rss_after_mib": round(_rss() / MIB, 1),
        "ray_workers_peak_rss_total_mib": round(max(p[2] for p in sampler.timeline) / MIB, 1),
        "ray_worker_peak_rss_each_mib": round(max(sampler.worker_peak.values(), default=0) / MIB, 1),
        "ray_worker_processes_most": sampler.most_workers,
        "ray_system_peak_rss_total_mib": round(max(p[3] for p in sampler.timeline) / MIB, 1),
        "timeline_s_driver_workers_system_mib_shards": _thin(sampler.timeline),
    }


def _summary(name: str, run: dict[str, Any]) -> str:
    return (f"  {name:<10} {run['rows']:>9,} rows in {run['wall_s']:7.1f} s = {run['rows_per_s']:7.1f} rows/s "
            f"(steady {run['rows_per_s_steady_10_to_90pct']:.1f}); driver peak {run['driver_peak_rss_mib']:.0f} MiB, "
            f"Ray workers {run['ray_workers_peak_rss_total_mib']:.0f} MiB; counts "
            f"{'as expected' if run['status_counts_as_expected'] else 'WRONG: ' + str(run['status_counts'])}")


# -- manifest queries ------------------------------------------------------------------------------------------


def _median_time(fn, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _command(*args: str, cpu: list[float]) -> Any:
    """`clipforge manifest ARGS --json` in a fresh process; appends its CPU seconds to `cpu`."""
    cli = Path(sys.executable).parent / "clipforge"
    before = _children_cpu_s()
    done = subprocess.run([str(cli), "manifest", *args, "--json"], capture_output=True, text=True, check=True)
    cpu.append(_children_cpu_s() - before)
    return json.loads(done.stdout)


def snippet_failures(out: Path) -> dict[str, int]:
    """README: failures by reason, with pyarrow alone."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    manifest = ds.dataset(out / "manifest", format="parquet")
    failed = manifest.to_table(columns=["status"], filter=pc.field("status") != "ok")
    return dict(zip(*failed.group_by("status").aggregate([("status", "count")]).to_pydict().values()))


def snippet_row(out: Path, index: int) -> dict[str, Any]:
    """README: one row by index, with pyarrow alone."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    manifest = ds.dataset(out / "manifest", format="parquet")
    return manifest.to_table(filter=pc.field("row") == index).to_pylist()[0]


def time_queries(out: Path, rows: int, base: str, dedup: bool, repeats: int = 3) -> dict[str, Any]:
    """Each question through the command (a fresh process each time) and through the snippet (in this process)."""
    expected = {k: v for k, v in expected_counts(rows, dedup).items() if k != "ok"}
    probes = [rows // 2 + 7, FAIL_EVERY // 2, rows - 1]  # an image, a bad-bytes row, the last row
    fail_cpu: list[float] = []
    row_cpu: list[float] = []
    cmd_fail_s, cmd_fail = _median_time(lambda: _command("failures", str(out), cpu=fail_cpu), repeats)
    snip_fail_s, snip_fail = _median_time(lambda: snippet_failures(out), repeats)
    cmd_row_s, snip_row_s, rows_ok = [], [], True
    for index in probes:
        seconds, found = _median_time(lambda i=index: _command("row", str(out), str(i), cpu=row_cpu), repeats)
        cmd_row_s.append(seconds)
        rows_ok &= found["row"] == index and found["url"] == url_for(base, index)
        seconds, found = _median_time(lambda i=index: snippet_row(out, i), repeats)
        snip_row_s.append(seconds)
        rows_ok &= found["row"] == index
    answers_ok = cmd_fail["by_reason"] == expected and snip_fail == expected and rows_ok
    # Wall seconds (median of the repeats; for rows, the slowest probe) and CPU seconds of the command's process:
    # on a busy machine the wall time is mostly waiting for a core.
    command = {"failures_s": round(cmd_fail_s, 3), "row_s": round(max(cmd_row_s), 3),
               "failures_cpu_s": round(statistics.median(fail_cpu), 3), "row_cpu_s": round(max(row_cpu), 3)}
    snippet = {"failures_s": round(snip_fail_s, 3), "row_s": round(max(snip_row_s), 3)}
    # Either way of asking may answer within the limit (the requirement names both); both are reported.
    passed = answers_ok and all(min(command[k], snippet[k]) < QUERY_LIMIT_S for k in snippet)
    return {"command_cold_process": command, "snippet_in_process": snippet,
            "rows_probed": probes, "repeats_median_of": repeats,
            "answers_as_expected": answers_ok, "limit_s": QUERY_LIMIT_S, "pass": passed}


# -- main ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Rows of the big build.")
    parser.add_argument("--reference-rows", type=int, default=REFERENCE_ROWS, help="Rows of the reference build.")
    parser.add_argument("--repeats", type=int, default=2, help="Reference builds before the big one (one more after).")
    parser.add_argument("--samples-per-shard", type=int, default=SHARD, help="output.samples_per_shard.")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "scale", help="Scratch folder.")
    parser.add_argument("--result", type=Path, default=RESULT, help="Where to write the JSON result.")
    parser.add_argument("--keep-output", action="store_true", help="Keep the big build's output (GBs at 1M rows).")
    parser.add_argument("--no-dedup", action="store_true", help="Builds without filters.dedup_exact.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    per_shard = args.samples_per_shard
    warmup_rows = WARMUP_SHARDS * per_shard

    import ray

    cores = os.cpu_count() or 1
    args.work.mkdir(parents=True, exist_ok=True)
    server, base = start_server()
    load_before = os.getloadavg()
    try:
        lists = {name: write_url_list(args.work / f"urls-{name}.parquet", n, base)
                 for name, n in (("warmup", warmup_rows), ("reference", args.reference_rows), ("big", args.rows))}
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        setup = Setup(per_shard, not args.no_dedup, {server.pid})
        run_one(lists["warmup"], warmup_rows, args.work / "out-warmup", setup)  # Ray workers, caches
        reference: list[dict[str, Any]] = []

        def reference_run() -> None:
            reference.append(run_one(lists["reference"], args.reference_rows, args.work / "out-reference", setup))
            print(_summary(f"ref {len(reference)}", reference[-1]), flush=True)

        for _ in range(args.repeats):
            reference_run()
        big = run_one(lists["big"], args.rows, args.work / "out-big", setup)
        print(_summary("big", big), flush=True)
        reference_run()
        ray.shutdown()
        queries = time_queries(args.work / "out-big", args.rows, base, setup.dedup)
    finally:
        server.terminate()
        server.join(timeout=10)
    load_after = os.getloadavg()
    if not args.keep_output:
        shutil.rmtree(args.work / "out-big", ignore_errors=True)

    ref_rate = statistics.median(r["rows_per_s"] for r in reference)
    ratio = big["rows_per_s"] / ref_rate
    ref_steady = statistics.median(r["rows_per_s_steady_10_to_90pct"] for r in reference)
    memory_ok = big["driver_peak_rss_mib"] * MIB < DRIVER_RSS_LIMIT
    counts_ok = big["status_counts_as_expected"] and all(r["status_counts_as_expected"] for r in reference)
    passed = ratio >= TARGET and memory_ok and queries["pass"] and counts_ok
    command = " ".join(["nice -n 10 .venv/bin/python benchmarks/build_scale.py", *sys.argv[1:]])
    report = {
        "command": command,
        "rows": args.rows,
        "reference_rows": args.reference_rows,
        "settings": {"samples_per_shard": per_shard, "dedup_exact": not args.no_dedup, "image_size": IMAGE_SIZE, "resize_mode": "border",
                     "format": "jpg", "quality": 90, "workers": WORKERS, "cpus_per_worker": CPUS_PER_WORKER,
                     "threads_per_worker": THREADS, "failures": f"every {FAIL_EVERY}th row 404, every {FAIL_EVERY}th "
                     "(offset 20) bad bytes: 5%", "duplicates": f"every {DUPLICATE_EVERY}th row (offset 10) the bytes "
                     "of the row before: 5%", "images": f"{TINY_IMAGES} distinct 24x24 JPEGs, loopback asyncio server"},
        "machine": {"cpu_count": cores, "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in load_after]},
        "reference_runs": reference,
        "big_run": big,
        "reference_median_rows_per_s": round(ref_rate, 1),
        "big_rows_per_s": big["rows_per_s"],
        "ratio_big_over_reference": round(ratio, 4),
        "steady_ratio_big_over_reference": round(big["rows_per_s_steady_10_to_90pct"] / ref_steady, 4) if ref_steady else None,
        "target_ratio": TARGET,
        "driver_peak_rss_mib": big["driver_peak_rss_mib"],
        "driver_rss_limit_mib": DRIVER_RSS_LIMIT // MIB,
        "ray_workers_peak_rss_total_mib": big["ray_workers_peak_rss_total_mib"],
        "ray_worker_peak_rss_each_mib": big["ray_worker_peak_rss_each_mib"],
        "manifest_queries": queries,
        "status_counts_as_expected": counts_ok,
        "pass": {"ratio": ratio >= TARGET, "driver_memory": memory_ok, "manifest_queries": queries["pass"],
                 "status_counts": counts_ok, "all": passed},
    }
    write_report(args.result, report)
    print(f"reference median {ref_rate:.1f} rows/s; big {big['rows_per_s']:.1f} rows/s; steady-state ratio "
          f"{report['steady_ratio_big_over_reference']}")
    print(f"driver peak RSS {big['driver_peak_rss_mib']:.0f} MiB (limit {DRIVER_RSS_LIMIT // MIB}) "
          f"{'PASS' if memory_ok else 'FAIL'}; Ray workers {big['ray_workers_peak_rss_total_mib']:.0f} MiB together, "
          f"{big['ray_worker_peak_rss_each_mib']:.0f} MiB the largest; Ray's own processes "
          f"{big['ray_system_peak_rss_total_mib']:.0f} MiB")
    q_cmd, q_snip = queries["command_cold_process"], queries["snippet_in_process"]
    print(f"manifest queries on {args.rows:,} rows: failures {q_cmd['failures_s']:.2f} s (command) / "
          f"{q_snip['failures_s']:.2f} s (snippet), one row {q_cmd['row_s']:.2f} s / {q_snip['row_s']:.2f} s "
          f"(limit {QUERY_LIMIT_S} s) {'PASS' if queries['pass'] else 'FAIL'}")
    print(result_line("build_scale", ratio, TARGET, passed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
