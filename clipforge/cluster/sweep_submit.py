"""`clipforge submit sweep.yaml --address URL`: each child of a sweep becomes its own Ray job, with at most
`max_concurrent` of them submitted and not yet ended; this process follows them and keeps sweep.json current.

The sweep's storage must be reachable from here and from the cluster's jobs (shared or remote storage):
this process writes sweep.json there and the jobs write their run directories beside it. Stopping this
process leaves the submitted jobs running; submitting the same sweep again follows them instead of
submitting them twice, skips finished children and resubmits failed or stopped ones.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from clipforge.cluster.submit import ClusterError, job_info, job_logs, job_status, submit_spec
from clipforge.cluster.sweep_children import Child, expand_children
from clipforge.cluster.sweep_record import SweepRecord, claim_sweep_folder, finish_marker, has_finished
from clipforge.cluster.sweep_run import outcome

log = logging.getLogger(__name__)

_RECORD_STATUS = {"SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "stopped"}
IN_PROGRESS = ("PENDING", "RUNNING")


def job_error(client, job_id: str) -> str:
    """Why a job failed, in one line: the last `error:` line clipforge printed, else Ray's message."""
    try:
        lines = job_logs(client, job_id).splitlines()
    except ClusterError:
        lines = []
    mine = [ln.strip()[len("error:"):].strip() for ln in lines if ln.strip().startswith("error:")]
    if mine:
        return mine[-1]
    # Ray's message ("Job entrypoint command failed with exit code N, last available logs ...") then the
    # last thing the job printed.
    message = (job_info(client, job_id).message or "").strip()
    first = message.splitlines()[0].split(", last available logs")[0] if message else f"job {job_id} failed"
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
    return f"{first}; last log line: {last[:300]}" if last else first


def _status_or_none(client, job_id: str) -> str | None:
    try:
        return job_status(client, job_id)
    except ClusterError:  # gone (a restarted cluster): the child is submitted again
        return None


class _Follower:
    """The jobs in flight and the status last seen of each."""

    def __init__(self, client, record: SweepRecord, on_status: Callable[[str], None]):
        self.client, self.record, self.on_status = client, record, on_status
        self.running: dict[str, Child] = {}
        self.seen: dict[str, str] = {}

    def track(self, child: Child, job_id: str, status: str) -> None:
        self.running[job_id] = child
        self.seen[job_id] = status
        self.on_status(f"{child.dir}: {status} ({job_id})")

    def poll(self) -> None:
        for job_id, child in list(self.running.items()):
            status = job_status(self.client, job_id)
            if status != self.seen[job_id]:
                self.seen[job_id] = status
                self.on_status(f"{child.dir}: {status} ({job_id})")
            if status in _RECORD_STATUS:
                del self.running[job_id]
                self.end(child, job_id, status)

    def end(self, child: Child, job_id: str, status: str) -> None:
        error = job_error(self.client, job_id) if status == "FAILED" else None
        if status == "STOPPED":
            error = f"job {job_id} was stopped"
        if status == "SUCCEEDED" and not has_finished(child):
            log.warning("child %s: job %s succeeded but %s is not visible from here; is the sweep's storage "
                        "shared with the cluster?", child.dir, job_id, finish_marker(child))
        self.record.ended(child, _RECORD_STATUS[status], error)
        if error:
            self.on_status(f"{child.dir}: {error}")


def submit_sweep(client, spec, *, working_dir: str | Path | None = None, entrypoint_num_cpus: float = 0.0,
                 entrypoint_num_gpus: float = 0.0, poll_s: float = 2.0,
                 on_status: Callable[[str], None] = lambda line: None,
                 credentials: dict[str, str] | None = None) -> dict:
    """Submit and follow the children of a validated sweep; returns the summary of `sweep_run.outcome`,
    or raises SweepFailed once every child has ended when any did not finish.

    `credentials`: the object-store settings handed to every child (as `submit_spec` takes them: None for this
    shell's, {} for none)."""
    children = expand_children(spec)
    claim_sweep_folder(spec, children)
    record = SweepRecord(spec, children, mode="submit", address=client.get_address())
    follower = _Follower(client, record, on_status)
    queue = []
    for child in children:
        if record.finished_before(child):
            on_status(f"{child.dir}: finished in an earlier run; skipped")
            continue
        job_id = record.previous_job(child)
        status = _status_or_none(client, job_id) if job_id else None
        if job_id is not None and (status in IN_PROGRESS or (status == "SUCCEEDED" and has_finished(child))):
            record.adopt(child)
            follower.track(child, job_id, status)
        else:
            queue.append(child)
    record.write()
    while queue or follower.running:
        while queue and len(follower.running) < spec.max_concurrent:
            child = queue.pop(0)
            try:
                job_id = submit_spec(client, child.spec, working_dir=working_dir,
                                     entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
                                     credentials=credentials)
            except ClusterError as e:
                record.started(child)
                record.ended(child, "failed", f"not submitted: {e}")
                on_status(f"{child.dir}: not submitted: {e}")
                continue
            record.started(child, job_id)
            follower.track(child, job_id, "SUBMITTED")
        if follower.running:
            time.sleep(poll_s)
            follower.poll()
    return outcome(spec, record)
