"""STORAGE/sweep.json: what a sweep varies and the state of each child, rewritten whole (atomically) whenever
a child starts or ends, so the dashboard and a resumed sweep always read a complete file.

Shape (read by clipforge.dashboard.sweeps):
  {"kind": "sweep", "name", "base_kind", "storage", "mode": "local"|"submit", "max_concurrent", "updated",
   "fields": {field: [values]},
   "children": [{"dir", "name", "values": {field: value}, "status", "spec_sha256",
                 "job_id"?, "error"?, "started"?, "ended"?, "seconds"?}]}
Status: pending, running, finished, failed or stopped. A child counts as finished only while its run
directory also holds its kind's end-of-job file, so a resumed sweep reruns it when that file is gone.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clipforge.cluster.sweep_children import Child, join_path, storage_root
from clipforge.runtime.output_folder import OutputOwner, claim_output_folder
from clipforge.runtime.run_dir import ERROR_FILE, FINISH_FILES, SWEEP_FILE, dump_spec

log = logging.getLogger(__name__)

TERMINAL = ("finished", "failed", "stopped")


def spec_digest(spec) -> str:
    return hashlib.sha256(dump_spec(spec).encode()).hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_atomically(path: str, text: str) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    parent = p.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        fd, tmp = tempfile.mkstemp(prefix=".sweep-", suffix=".tmp", dir=parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, p)
        except BaseException:
            _quietly(os.unlink, tmp)
            raise
    else:
        fs.pipe_file(p, text.encode("utf-8"))  # object stores replace an object in one step


def _quietly(fn, *args) -> Any:
    """fn(*args), or None where the storage answers with an OSError (best-effort bookkeeping)."""
    try:
        return fn(*args)
    except OSError:
        return None


def _read_previous(path: str) -> dict:
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); every child runs again", path, e)
        return {}
    return obj if isinstance(obj, dict) else {}


def finish_marker(child: Child) -> str:
    return join_path(child.run_dir, FINISH_FILES[child.spec.kind])


def has_finished(child: Child) -> bool:
    fs, p = fsspec.core.url_to_fs(finish_marker(child))
    return bool(_quietly(fs.exists, p))


def claim_sweep_folder(spec, children: list[Child]) -> None:
    """Make STORAGE this sweep's folder before anything is written (see clipforge.runtime.output_folder): it holds
    sweep.json and one run directory per child."""
    owner = OutputOwner("sweep", spec.name, "storage", own_names=(SWEEP_FILE, *(c.dir for c in children)),
                        signature=(SWEEP_FILE,))
    claim_output_folder(storage_root(spec.storage), owner, overwrite=spec.overwrite)


class SweepRecord:
    """The sweep's children and their state, mirrored to STORAGE/sweep.json on every change."""

    def __init__(self, spec, children: list[Child], mode: str, address: str | None = None):
        self.root = storage_root(spec.storage)
        self.path = join_path(self.root, SWEEP_FILE)
        self.children = {c.dir: c for c in children}
        previous = {e.get("dir"): e for e in _read_previous(self.path).get("children") or [] if isinstance(e, dict)}
        self.head = {"kind": "sweep", "name": spec.name, "base_kind": children[0].spec.kind if children else None,
                     "storage": self.root, "mode": mode, "max_concurrent": spec.max_concurrent,
                     "fields": spec.axes()}
        if address:
            self.head["address"] = address
        self.entries: dict[str, dict] = {}
        self.previous: dict[str, dict] = {}
        for c in children:
            entry = {"dir": c.dir, "name": c.spec.name, "values": c.values, "status": "pending",
                     "spec_sha256": spec_digest(c.spec)}
            old = previous.get(c.dir)
            if old and old.get("spec_sha256") == entry["spec_sha256"]:
                self.previous[c.dir] = old
            elif old:
                log.info("child %s changed since the sweep last ran; it runs again", c.dir)
            self.entries[c.dir] = entry

    def finished_before(self, child: Child) -> bool:
        """Whether a previous run of this sweep finished this child (and its run directory says so);
        such a child keeps its old record."""
        old = self.previous.get(child.dir)
        if old and old.get("status") == "finished" and has_finished(child):
            self.entries[child.dir] = dict(old)
            return True
        return False

    def previous_job(self, child: Child) -> str | None:
        """The cluster job a previous `submit` of this sweep left running for this child."""
        old = self.previous.get(child.dir) or {}
        return old.get("job_id") if old.get("status") in ("pending", "running") else None

    def adopt(self, child: Child) -> None:
        """Take over this child's entry from the previous run (its job is still on the cluster)."""
        self.entries[child.dir] = dict(self.previous[child.dir])

    def started(self, child: Child, job_id: str | None = None) -> None:
        entry = self.entries[child.dir]
        for key in ("error", "ended", "seconds"):
            entry.pop(key, None)
        entry.update(status="running", started=_now(), _t0=time.time())
        if job_id:
            entry["job_id"] = job_id
        # A rerun must not leave the last failure's marker behind: the dashboard shows a run whose newest file
        # is error.json as failed.
        fs, p = fsspec.core.url_to_fs(join_path(child.run_dir, ERROR_FILE))
        if _quietly(fs.exists, p):
            _quietly(fs.rm_file, p)
        self.write()

    def ended(self, child: Child, status: str, error: str | None = None) -> None:
        entry = self.entries[child.dir]
        t0 = entry.pop("_t0", None)
        entry.update(status=status, ended=_now())
        if t0 is not None:
            entry["seconds"] = round(time.time() - t0, 1)
        if error:
            entry["error"] = error
            self._mark_run_failed(child, error)
        self.write()

    def _mark_run_failed(self, child: Child, error: str) -> None:
        path = join_path(child.run_dir, ERROR_FILE)
        try:
            _write_atomically(path, json.dumps({"message": error, "sweep": self.head["name"]}) + "\n")
        except OSError as e:
            log.warning("could not write %s: %s", path, e)

    def to_json(self) -> dict:
        children = [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.entries.values()]
        return {**self.head, "updated": _now(), "children": children}

    def write(self) -> None:
        _write_atomically(self.path, json.dumps(self.to_json(), indent=2, default=str) + "\n")

    def unfinished(self) -> list[str]:
        return [d for d, e in self.entries.items() if e["status"] != "finished"]

    def summary(self) -> dict:
        return {"sweep": self.path, "children": {d: e["status"] for d, e in self.entries.items()}}
