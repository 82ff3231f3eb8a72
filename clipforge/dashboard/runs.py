"""Finding run directories under the runs folder and summarising each one as a row of the runs table.

A run directory holds metrics.jsonl, summary.json or results.jsonl (an eval job's output; results.json in
folders written before), or just spec.yaml (a training run that has not logged yet). Any directory holding run
directories is a group; only a group with sweep.json (written by the sweep runner) is a sweep, and only a sweep's
runs show it in the `sweep` column (every run shows its parent folder in `folder`).

The spec columns (kind, name, model, trainable) come from the run's index run.json; runs written before
it existed have only spec.yaml, whose head is read instead (clipforge.runtime.run_dir: the same fields).

Status: `failed` if FAILED or error.json is newer than the run's other files, `finished` if
summary.json exists (eval outputs are finished), `running` if metrics.jsonl changed within the
running window, else `stopped`.

Rows are cached per run and rebuilt only from the files whose size or modification time changed;
a growing metrics.jsonl is read from where the last scan stopped.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from clipforge.dashboard import sweeps
from clipforge.dashboard.evals import eval_files, keyed_values, read_results, training_keys
from clipforge.dashboard.metrics_log import MetricsDigest
from clipforge.dashboard.model_cost import ModelCosts
from clipforge.dashboard.spec import DashboardSpec
from clipforge.dashboard.tree import Entry, PathNotFound, RunTree, join_rel
from clipforge.runtime.run_dir import (
    CHECKPOINTS_DIR,
    EVAL_DIRS,
    EVAL_RESULTS_FILES,
    FAILURE_FILES,
    INDEX_FILE,
    METRICS_FILE,
    RAY_DIR,
    SPEC_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    index_from_spec_yaml,
    read_index,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_FAILURE_NAMES = frozenset(FAILURE_FILES)
_EVAL_DIR_NAMES = frozenset(EVAL_DIRS)
RUN_MARKERS = (METRICS_FILE, SUMMARY_FILE, *EVAL_RESULTS_FILES)
# Folders inside runs that never hold other runs, and are often large.
SKIP_DIRS = {CHECKPOINTS_DIR, RAY_DIR, "__pycache__", "node_modules"}


@dataclass
class RunDir:
    id: str
    entries: dict[str, Entry]


@dataclass
class Group:
    id: str
    runs: list[str] = field(default_factory=list)
    sweep: dict | None = None  # sweep.json, when there is one: only then is the group a sweep
    child_values: dict[str, dict] = field(default_factory=dict)  # child folder -> its swept field values


def _child(folder: str, name: str) -> str:
    """join_rel for the one-name case (the scan's hot path)."""
    return f"{folder}/{name}" if folder else name


def in_parallel(tree: RunTree, fn: Callable[[T], R], items: list[T]) -> list[R]:
    """[fn(item) for item in items], with up to `tree.parallel_requests` in flight (object stores are
    latency-bound: a folder of runs on S3 listed one request at a time takes seconds)."""
    workers = min(tree.parallel_requests, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="runs-scan") as pool:
        return list(pool.map(fn, items))


def _names(tree: RunTree, rel: str) -> list[Entry] | None:
    try:
        # Names first: folders that are not runs (data, shards) may hold thousands of files.
        return tree.listdir(rel, stat=False)
    except (PathNotFound, OSError):
        return None


def discover(tree: RunTree, max_depth: int) -> tuple[list[RunDir], dict[str, Group]]:
    """Run directories and groups under the root, breadth first, at most `max_depth` levels down.

    Each level's folders are listed together (see in_parallel) and then visited in order, so the result is
    the same however many listings are in flight."""
    runs: list[RunDir] = []
    groups: dict[str, Group] = {}
    level: list[tuple[str, int]] = [("", 0)]
    while level:
        listings = in_parallel(tree, lambda item: _names(tree, item[0]), level)
        frontier: list[tuple[str, int]] = []
        for (rel, depth), listing in zip(level, listings):
            if listing is None:
                continue
            _visit(tree, rel, depth, listing, max_depth, runs, groups, frontier)
        level = frontier
    # Parents are known only now: a run's group is its nearest ancestor that holds runs.
    holds_runs = {r.id.rsplit("/", i)[0] for r in runs for i in range(1, r.id.count("/") + 1)}
    if any(r.id for r in runs):
        holds_runs.add("")
    runs = [r for r in runs if r.id not in holds_runs]
    for r in runs:
        if r.id:
            parent = r.id.rsplit("/", 1)[0] if "/" in r.id else ""
            if parent:
                groups.setdefault(parent, Group(parent)).runs.append(r.id)
    return runs, groups


def _visit(tree: RunTree, rel: str, depth: int, listing: list[Entry], max_depth: int, runs: list[RunDir],
           groups: dict[str, Group], frontier: list[tuple[str, int]]) -> None:
    """Record folder `rel` as a run and/or group, and queue its subfolders in `frontier`."""
    entries = {e.name: e for e in listing}
    is_group = SWEEP_FILE in entries
    if not is_group and _has_run_marker(entries):
        runs.append(RunDir(rel, {e.name: e for e in tree.with_stats(rel, listing)}))
        return
    if is_group:
        sweep = sweeps.read_sweep_file(tree, join_rel(rel, SWEEP_FILE))
        groups[rel] = Group(rel, sweep=sweep, child_values=sweeps.child_values(sweep))
    # A directory with only spec.yaml is a run that has not logged yet, unless runs are found below it.
    pending_run = SPEC_FILE in entries and not is_group
    if depth < max_depth:
        skip = SKIP_DIRS | _EVAL_DIR_NAMES if pending_run else SKIP_DIRS
        for e in sorted(listing):  # by name: names in a folder are unique
            if e.is_dir and not e.name.startswith(".") and e.name not in skip:
                frontier.append((_child(rel, e.name), depth + 1))
    if pending_run:
        runs.append(RunDir(rel, {e.name: e for e in tree.with_stats(rel, listing)}))


def _has_run_marker(entries: dict[str, Entry]) -> bool:
    for name in RUN_MARKERS:
        e = entries.get(name)
        if e is not None and not e.is_dir:
            return True
    return False


@contextlib.contextmanager
def _no_gc():
    """Pause the cycle collector: a scan allocates hundreds of thousands of small objects (none in cycles),
    which would otherwise trigger repeated full collections of everything the process holds."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # Move what the scan made straight to the oldest generation (freeze + unfreeze does that at no
        # cost): the first young-generation collection after it would otherwise walk all of it.
        gc.freeze()
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def _file_sigs(entries: dict[str, Entry]) -> dict[str, tuple[int, float]]:
    """(size, modification time) of each file of a run folder: what tells whether it changed."""
    return {name: (e.size, e.mtime) for name, e in entries.items() if not e.is_dir}


def _read_json(tree: RunTree, path: str, size: int = -1) -> dict | None:
    try:
        obj = json.loads(tree.read_bytes(path, size=size))
    except (OSError, ValueError):
        return None  # half-written or unreadable: shown as missing until the next scan
    return obj if isinstance(obj, dict) else None


def _failure_message(tree: RunTree, run_id: str, entries: dict[str, Entry]) -> str | None:
    for name in FAILURE_FILES:
        if name in entries and not entries[name].is_dir:
            try:
                text = tree.read_text(join_rel(run_id, name)).strip()
            except OSError:
                return f"{name} present"
            if name.endswith(".json"):
                try:
                    obj = json.loads(text)
                    if isinstance(obj, dict):
                        text = str(obj.get("message") or obj.get("error") or obj)
                except ValueError:
                    pass
            return (text.splitlines() or [f"{name} present"])[0][:500]
    return None


@dataclass
class _Cached:
    """What was read from one run directory, with the file signatures it was read at."""

    sigs: dict = field(default_factory=dict)
    header: dict = field(default_factory=dict)
    summary: dict | None = None
    digest: MetricsDigest = field(default_factory=MetricsDigest)
    file_evals: dict[str, float] = field(default_factory=dict)
    eval_model: str | None = None
    failure: str | None = None
    changed: bool = True
    row: dict | None = None
    row_key: tuple | None = None


class RunIndex:
    """Scans the runs folder on demand and keeps the per-run summaries between scans (thread-safe)."""

    def __init__(self, tree: RunTree, spec: DashboardSpec, costs: ModelCosts | None = None):
        self.tree = tree
        self.spec = spec
        self.costs = costs or ModelCosts(enabled=spec.estimate_compute)
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()
        self._snapshot: tuple[float, list[dict], dict[str, Group]] | None = None

    def scan(self, max_age_s: float | None = None) -> tuple[list[dict], dict[str, Group]]:
        """(rows, groups), rescanning unless the last scan is younger than `max_age_s`."""
        max_age = self.spec.rescan_interval_s if max_age_s is None else max_age_s
        with self._lock:
            if self._snapshot and time.monotonic() - self._snapshot[0] < max_age:
                return self._snapshot[1], self._snapshot[2]
            with _no_gc():
                runs, groups = discover(self.tree, self.spec.max_depth)
                now = time.time()
                # Each run's row reads only its own files and cache entry: rows can be built side by side.
                rows = in_parallel(self.tree, lambda r: self._row(r, groups, now), runs)
            live = {r.id for r in runs}
            for stale in set(self._cache) - live:
                del self._cache[stale]
            self._snapshot = (time.monotonic(), rows, groups)
            return rows, groups

    def row(self, run_id: str) -> dict | None:
        """The up-to-date row of one run, re-reading only that run's folder when the last scan knew it
        (a run page polls every few seconds; rescanning thousands of runs for it would be waste)."""
        with self._lock:
            snapshot = self._snapshot
            if snapshot is not None and any(r["id"] == run_id for r in snapshot[1]):
                _, rows, groups = snapshot
                try:
                    entries = {e.name: e for e in self.tree.listdir(run_id)}
                except (PathNotFound, OSError):
                    entries = None
                if entries is not None:
                    row = self._row(RunDir(run_id, entries), groups, time.time())
                    for i, old in enumerate(rows):
                        if old["id"] == run_id:
                            rows[i] = row
                    return row
        rows, _ = self.scan()
        return next((r for r in rows if r["id"] == run_id), None)

    # -- one run -------------------------------------------------------------------------------

    def _refresh(self, run: RunDir, files: dict[str, tuple[int, float]]) -> _Cached:
        """Re-read what changed in the run's folder (`files`: its _file_sigs); `changed` says whether anything did."""
        c = self._cache.get(run.id)
        if c is None:
            c = self._cache[run.id] = _Cached()
        before = dict(c.sigs)
        e = run.entries
        header_sig = (files.get(INDEX_FILE), files.get(SPEC_FILE))
        if header_sig != c.sigs.get("header"):
            c.header = self._read_header(run.id, *header_sig)
            c.sigs["header"] = header_sig
        summary_sig = files.get(SUMMARY_FILE)
        if summary_sig != c.sigs.get(SUMMARY_FILE):
            c.summary = _read_json(self.tree, _child(run.id, SUMMARY_FILE), summary_sig[0]) if summary_sig else None
            c.sigs[SUMMARY_FILE] = summary_sig
        self._refresh_metrics(run, c, files.get(METRICS_FILE))
        self._refresh_evals(run, c)
        failure_sig = tuple([files.get(n) for n in FAILURE_FILES])
        if failure_sig != c.sigs.get("failure"):
            c.failure = _failure_message(self.tree, run.id, e) if any(failure_sig) else None
            c.sigs["failure"] = failure_sig
        c.changed = c.sigs != before
        return c

    def _read_header(self, run_id: str, index_sig: tuple[int, float] | None,
                     spec_sig: tuple[int, float] | None) -> dict:
        """The spec fields of the table: from run.json, else (runs written before it existed, or a run.json that
        is half-written or not clipforge's) from spec.yaml; {} when neither can be read."""
        if index_sig is not None:
            try:
                index = read_index(self.tree.read_bytes(_child(run_id, INDEX_FILE), size=index_sig[0]))
            except (OSError, ValueError, RecursionError):  # unreadable, half-written or absurdly nested
                index = None
            if index is not None:
                return index
        if spec_sig is None:
            return {}
        try:
            return index_from_spec_yaml(self.tree.read_text(_child(run_id, SPEC_FILE), size=spec_sig[0]))
        except Exception:  # noqa: BLE001 - a broken spec leaves the spec columns blank
            return {}

    def _refresh_metrics(self, run: RunDir, c: _Cached, sig: tuple[int, float] | None) -> None:
        if sig == c.sigs.get(METRICS_FILE):
            return
        c.sigs[METRICS_FILE] = sig
        path = _child(run.id, METRICS_FILE)
        if sig is None:
            c.digest = MetricsDigest()
            return
        try:
            if sig[0] >= c.digest.offset and c.digest.offset:
                if c.digest.continue_with(self.tree.read_bytes(path, c.digest.resume_start())):
                    return
            digest = MetricsDigest()
            digest.feed(self.tree.read_bytes(path, size=sig[0]))
            c.digest = digest
        except OSError as err:
            log.warning("cannot read %s: %s", path, err)
            c.sigs[METRICS_FILE] = None

    def _refresh_evals(self, run: RunDir, c: _Cached) -> None:
        e = run.entries
        files: list[tuple[str, Entry]] = []
        own = _results_file(e)
        if own is not None:
            files.append((_child(run.id, own), e[own]))
        if not _EVAL_DIR_NAMES.isdisjoint(e):
            try:
                files += eval_files(self.tree, run.id, e)
            except (PathNotFound, OSError):
                pass
        sig = tuple([(p, f.size, f.mtime) for p, f in files])
        if sig == c.sigs.get("evals"):
            return
        c.sigs["evals"] = sig
        if not files:  # most training runs
            c.file_evals, c.eval_model = {}, None
            return
        results = read_results(self.tree, [p for p, _ in files])
        c.file_evals = keyed_values(results)
        c.eval_model = next((str(r.get("model")) for r in results if r.get("model")), None)

    def _row(self, run: RunDir, groups: dict[str, Group], now: float) -> dict:
        files = _file_sigs(run.entries)
        c = self._refresh(run, files)
        parent = run.id.rsplit("/", 1)[0] if "/" in run.id else ""
        group = groups.get(parent)
        header = c.header
        model_section = as_mapping(header.get("model"))
        model = model_section.get("name") or c.eval_model
        e = run.entries
        kind = header.get("kind") or ("eval" if _results_file(e) else "train" if METRICS_FILE in e else "run")
        cost = self.costs.get(model) if kind == "train" else None
        sweep = group if group is not None and group.sweep is not None else None
        in_sweep = sweep is not None
        swept = sweep.child_values.get(run.id.rsplit("/", 1)[-1], {}) if sweep is not None else {}
        key = (cost, swept, in_sweep, files)
        if not c.changed and c.row is not None and c.row_key == key:
            c.row["status"] = self._status(e, c, now)
            return c.row
        row = self._build_row(run, c, now, cost, files)
        row.update(sweep=parent if in_sweep else None, folder=parent or None, swept=swept, kind=kind, model=model,
                   trainable=model_section.get("trainable"))
        c.row, c.row_key = row, key
        return row

    def _build_row(self, run: RunDir, c: _Cached, now: float, cost, files: dict[str, tuple[int, float]]) -> dict:
        e = run.entries
        header, summary, digest = c.header, c.summary or {}, c.digest
        last = digest.last or {}
        params, gmacs = _number(summary.get("params")), _number(summary.get("gmacs"))
        if cost is not None:
            params = params if params is not None else cost.params
            gmacs = gmacs if gmacs is not None else cost.gmacs
        samples_seen = _number(summary.get("samples_seen"))
        if samples_seen is None:
            samples_seen = _number(last.get("samples_seen"))
        evals = {**training_keys(digest.best_evals), **c.file_evals}
        return {
            "id": run.id,
            "name": str(header.get("name") or (run.id.rsplit("/", 1)[-1] if run.id else "(root)")),
            "dir": run.id.rsplit("/", 1)[-1] if run.id else "",
            "status": self._status(e, c, now),
            "error": c.failure,
            "params": params,
            "gmacs": gmacs,
            "samples_seen": samples_seen,
            "compute": gmacs * samples_seen if gmacs is not None and samples_seen is not None else None,
            "evals": evals,
            "step": _number(summary.get("steps")) or _number(last.get("step")),
            "epoch": _number(last.get("epoch")) or _number(summary.get("epochs")),
            "loss": _number(last.get("loss")) if last else _number(summary.get("final_loss")),
            "wall_seconds": _wall_seconds(summary, digest, last, e),
            "samples_per_second": _number(summary.get("samples_per_second")) or _number(
                last.get("samples_per_second")),
            "updated": max([mtime for _, mtime in files.values()], default=None),
        }

    def _status(self, e: dict[str, Entry], c: _Cached, now: float) -> str:
        if not _FAILURE_NAMES.isdisjoint(e):
            newest_other = max((x.mtime for n, x in e.items() if not x.is_dir and n not in FAILURE_FILES),
                               default=0.0)
            marker = max((e[n].mtime for n in FAILURE_FILES if n in e and not e[n].is_dir), default=None)
            if marker is not None and marker >= newest_other:
                return "failed"
        if SUMMARY_FILE in e or (_results_file(e) and METRICS_FILE not in e):
            return "finished"
        m = e.get(METRICS_FILE)
        if m is not None and now - m.mtime <= self.spec.running_window_s:
            return "running"
        return "stopped"


_LARGEST_FLOAT_INT = int(sys.float_info.max)


def as_mapping(value: object) -> dict:
    """`value` if it is a mapping, else an empty one (a section of a file written by hand may hold anything)."""
    return value if isinstance(value, dict) else {}


def _number(v) -> float | int | None:
    """`v` if it is a usable number, else None. Called a dozen times per row: the usual cases come first."""
    if v is None:
        return None
    kind = type(v)
    if kind is float:
        return v if v == v else None  # NaN -> None
    if kind is int:
        return v if -_LARGEST_FLOAT_INT <= v <= _LARGEST_FLOAT_INT else None  # larger ones overflow products
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return _number(float(v) if isinstance(v, float) else int(v))  # a subclass: as its base type


def _wall_seconds(summary: dict, digest: MetricsDigest, last: dict, entries: dict[str, Entry]) -> float | None:
    wall = _number(summary.get("wall_seconds"))
    if wall is not None:
        return float(wall)
    end = _number(last.get("time"))
    if end is None:
        return None
    spec_entry = entries.get(SPEC_FILE)
    start: float | None
    if spec_entry is not None and spec_entry.mtime <= end:
        start = spec_entry.mtime  # written when the run started
    else:
        start = _number((digest.first or {}).get("time"))
    return float(end - start) if start is not None else None


def _results_file(entries: dict[str, Entry]) -> str | None:
    """The name of the eval job's all-results file the folder holds (the current name first), if any."""
    for name in EVAL_RESULTS_FILES:
        e = entries.get(name)
        if e is not None and not e.is_dir:
            return name
    return None


def run_eval_results(tree: RunTree, run: RunDir) -> list[dict]:
    """Every eval result of a run (its own all-results file and its eval folders)."""
    files = []
    own = _results_file(run.entries)
    if own is not None:
        files.append(join_rel(run.id, own))
    try:
        files += [p for p, _ in eval_files(tree, run.id, run.entries)]
    except (PathNotFound, OSError):
        pass
    return read_results(tree, files)


__all__ = ["RunIndex", "RunDir", "Group", "discover", "run_eval_results"]
