"""`clipforge run sweep.yaml`: run a sweep's children on the local (or the sweep's `ray.address`) Ray.

max_concurrent 1 runs the children one after another in this process; more runs up to that many at once as
Ray tasks, each reserving CHILD_DRIVER_CPUS (a child's driver only coordinates: its workers reserve what the
child's own `scaling` says). A failed child is recorded and the others go on; finished children of an
earlier run of the same sweep are skipped, so running the command again resumes the sweep.
"""
from __future__ import annotations

import logging
import os

from clipforge.cluster.single_job import run_single_job
from clipforge.cluster.specs import validate_spec
from clipforge.cluster.sweep_children import Child, expand_children
from clipforge.cluster.sweep_record import SweepRecord, claim_sweep_folder
from clipforge.errors import UserError
from clipforge.runtime.ray_session import ray_session

log = logging.getLogger(__name__)

CHILD_DRIVER_CPUS = 0.25


class SweepFailed(UserError):
    """Some children of a sweep did not finish; the others did, and the sweep can be resumed."""


def failure_text(e: BaseException) -> str:
    """One line for sweep.json and the log: a user error's own message, else the exception's type and message."""
    text = str(e).strip() if isinstance(e, UserError) else f"{type(e).__name__}: {str(e).strip()}"
    return text.splitlines()[0] if text else type(e).__name__


def _run_child_here(child_spec) -> str | None:
    """Run one child in this process; None when it finished, else why it failed."""
    try:
        run_single_job(child_spec)
    except Exception as e:  # a failed child is recorded, the sweep goes on
        log.debug("child %s failed", child_spec.name, exc_info=True)
        return failure_text(e)
    return None


def _child_task(spec_data: dict, cwd: str) -> str | None:
    """A child as a Ray task: relative paths in its spec mean what they mean for the sweep's own process."""
    os.chdir(cwd)
    return _run_child_here(validate_spec(spec_data))


def _log_end(record: SweepRecord, child: Child, error: str | None) -> None:
    if error is None:
        log.info("sweep child %s finished in %.0f s", child.dir, record.entries[child.dir].get("seconds", 0))
    else:
        log.error("sweep child %s failed: %s", child.dir, error)


def _run_in_process(children: list[Child], record: SweepRecord) -> None:
    for n, child in enumerate(children, 1):
        log.info("sweep child %d/%d: %s (%s)", n, len(children), child.dir, child.run_dir)
        record.started(child)
        try:
            error = _run_child_here(child.spec)
        except BaseException:  # Ctrl-C: the child is left unfinished, a rerun resumes it
            record.ended(child, "stopped")
            raise
        record.ended(child, "finished" if error is None else "failed", error)
        _log_end(record, child, error)


def _run_as_tasks(children: list[Child], record: SweepRecord, max_concurrent: int) -> None:
    import ray

    task = ray.remote(num_cpus=CHILD_DRIVER_CPUS, max_retries=0)(_child_task)
    queue = list(children)
    running: dict[ray.ObjectRef, Child] = {}  # the task of each running child
    try:
        while queue or running:
            while queue and len(running) < max_concurrent:
                child = queue.pop(0)
                log.info("sweep child %s started (%s)", child.dir, child.run_dir)
                record.started(child)
                running[task.remote(child.spec.model_dump(mode="json"), os.getcwd())] = child
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                child = running.pop(ref)
                try:
                    error = ray.get(ref)
                except ray.exceptions.RayError as e:  # the task itself died (worker crash, out of memory)
                    error = failure_text(e)
                record.ended(child, "finished" if error is None else "failed", error)
                _log_end(record, child, error)
    except BaseException:
        for ref, child in running.items():
            ray.cancel(ref, force=True)
            record.ended(child, "stopped")
        raise


def run_sweep(spec) -> dict:
    """Run every child not finished yet; returns {sweep: sweep.json path, children: {dir: status}}.
    Raises SweepFailed (after all children have run) when any child failed."""
    children = expand_children(spec)
    claim_sweep_folder(spec, children)
    record = SweepRecord(spec, children, mode="local")
    todo = []
    for c in children:
        if record.finished_before(c):
            log.info("sweep child %s finished in an earlier run; skipped", c.dir)
        else:
            todo.append(c)
    record.write()
    if todo:
        with ray_session(spec.ray):
            if spec.max_concurrent == 1 or len(todo) == 1:
                _run_in_process(todo, record)
            else:
                _run_as_tasks(todo, record, spec.max_concurrent)
    return outcome(spec, record)


def outcome(spec, record: SweepRecord) -> dict:
    """The sweep's summary, or SweepFailed naming the children that did not finish."""
    unfinished = record.unfinished()
    if unfinished:
        total = len(record.entries)
        raise SweepFailed(
            f"sweep `{spec.name}`: {len(unfinished)} of {total} children did not finish ({', '.join(unfinished)}); "
            f"their errors are in {record.path}. Run the same command again to rerun them (finished children "
            "are skipped)"
        )
    return record.summary()
