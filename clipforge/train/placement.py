"""Waiting for Ray to place the training workers, and giving up after `scaling.placement_timeout_s`.

Ray Train (v2) reserves the whole worker group as one placement group before it starts any worker, at the
start and after every restart. Its controller waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by
default) for the group, then counts a WorkerGroupStartupTimeoutError as a controller failure and tries
again, as often as `FailureConfig.controller_failure_limit` allows: by default without end. A run whose
workers cannot be placed (a node died and no other can take its workers, or a worker asks for more than
any node has) then stays RUNNING forever, saying nothing.

So a training run hands Ray Train the spec's limit as that variable (Ray passes the driver's value on to
its controller) and allows no controller failure: the first wait that times out ends the run, and
`placement_failure` turns Ray's error into one line naming what was asked for and what the cluster has.
The other controller failure Ray would retry, a worker that dies while its group starts, then ends the
run too, with Ray's message. While the run waits, `PlacementWatch` logs what it waits for.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Iterator

from clipforge.errors import UserError

log = logging.getLogger(__name__)

# Read by Ray Train's worker group when it waits for its placement group (see the module doc).
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Placement group states that mean "not (or no longer) placed".
_WAITING_STATES = ("PENDING", "RESCHEDULING")
_FIELD = "scaling.placement_timeout_s"


class WorkersNotPlaced(UserError, RuntimeError):
    """Ray could not place the training workers within `scaling.placement_timeout_s`, or never can."""


def _amount(value: float) -> str:
    return f"{value:g}"


def resources_text(resources: dict[str, float]) -> str:
    """{CPU: 1, GPU: 0.5}, as messages show resources."""
    return "{" + ", ".join(f"{name}: {_amount(v)}" for name, v in resources.items()) + "}"


def _workers_text(workers: int, resources: dict[str, float]) -> str:
    return f"{workers} worker{'s' if workers != 1 else ''} of {resources_text(resources)}"


@contextlib.contextmanager
def placement_timeout(seconds: float) -> Iterator[None]:
    """RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S set to `seconds` in this process while a trainer's `fit()` starts its
    controller inside (the controller takes the variable's value with it), then as it was."""
    before = os.environ.get(START_TIMEOUT_VARIABLE)
    os.environ[START_TIMEOUT_VARIABLE] = repr(float(seconds))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(START_TIMEOUT_VARIABLE, None)
        else:
            os.environ[START_TIMEOUT_VARIABLE] = before


def describe_cluster(names: list[str]) -> str:
    """What the cluster has of the resources `names`: live nodes, in all, free now, and on its largest node."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()

    def of(resources: dict) -> dict[str, float]:
        return {name: float(resources.get(name, 0)) for name in names}

    text = (f"the cluster has {len(nodes)} live node{'s' if len(nodes) != 1 else ''} with "
            f"{resources_text(of(total))} in all ({resources_text(of(free))} free)")
    if len(nodes) > 1:
        text += f", at most {resources_text(largest_node(nodes, names))} on one node"
    return text


def largest_node(nodes: list[dict], names: list[str]) -> dict[str, float]:
    """Per resource, the most that one of `nodes` (as `ray.nodes()` lists them) has."""
    return {name: max((float(n.get("Resources", {}).get(name, 0)) for n in nodes), default=0.0) for name in names}


def _fits_no_node(resources: dict[str, float]) -> bool:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    most = largest_node(nodes, list(resources))
    return any(amount > most[name] + 1e-9 for name, amount in resources.items())


def placement_failure(err: BaseException, name: str, workers: int, resources: dict[str, float],
                      timeout_s: float) -> WorkersNotPlaced | None:
    """`err` from `trainer.fit()` as a WorkersNotPlaced when it says that the workers could not be placed, else
    None. Call it while Ray is still connected: the message says what the cluster has."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import InsufficientClusterResourcesError, WorkerGroupStartupTimeoutError

    failure = err.controller_failure if isinstance(err, ControllerError) else None
    asked = _workers_text(workers, resources)
    if isinstance(failure, InsufficientClusterResourcesError):
        # Raised at once on clusters whose (autoscaler) configuration says they can never have enough.
        said = " ".join(str(failure).split("\n")[1:2]) or str(failure)
        return WorkersNotPlaced(f"training `{name}` can never place {asked}: {said.strip()}; lower "
                                "scaling.workers or what each worker asks for, or add nodes")
    if not isinstance(failure, WorkerGroupStartupTimeoutError):
        return None
    what = f"training `{name}` could not place {asked} for {_amount(timeout_s)} s ({_FIELD})"
    cluster = describe_cluster(list(resources))
    if _fits_no_node(resources):
        return WorkersNotPlaced(f"{what}; {cluster}, and no node has what one worker asks for: lower "
                                "scaling.cpus_per_worker / gpus_per_worker / resources, or add larger nodes")
    return WorkersNotPlaced(f"{what}; {cluster}; raise {_FIELD} or add nodes")


class PlacementWatch:
    """While a trainer's `fit()` runs: when the worker group's placement group waits, logs every `every_s` what it
    waits for and since when (a context manager; the watching runs in a thread of its own).

    Ray does not say which placement group is a run's; the watch takes every waiting group of exactly the run's
    shape (`workers` bundles of `resources`) for it.
    """

    def __init__(self, name: str, workers: int, resources: dict[str, float], timeout_s: float):
        self.name, self.workers, self.resources, self.timeout_s = name, workers, resources, timeout_s
        # About ten lines over a whole wait, at most one a minute, none for waits shorter than a second.
        self.every_s = min(60.0, max(1.0, timeout_s / 10))
        # The placement group table lists the whole cluster's groups: asked every 2 s at most.
        self.poll_s = min(2.0, self.every_s / 2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"placement-watch-{name}", daemon=True)

    def __enter__(self) -> "PlacementWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        waiting_since: dict[str, float] = {}  # placement group id -> when this watch first saw it waiting
        logged_at = -float("inf")
        while not self._stop.wait(self.poll_s):
            waiting = self._waiting_groups()
            if waiting is None:
                continue
            now = time.monotonic()
            waiting_since = {pg: waiting_since.get(pg, now) for pg in waiting}
            if not waiting_since:
                continue
            waited = now - min(waiting_since.values())
            if waited >= self.every_s and now - logged_at >= self.every_s:
                log.warning("%s", self.waiting_message(waited))
                logged_at = now

    def waiting_message(self, waited_s: float) -> str:
        try:
            cluster = describe_cluster(list(self.resources))
        except Exception as e:  # noqa: BLE001 - the message goes out without it rather than not at all
            cluster = f"what the cluster has is unknown ({type(e).__name__}: {e})"
        return (f"training `{self.name}` is waiting for Ray to place {_workers_text(self.workers, self.resources)}: "
                f"{waited_s:.0f} s so far, gives up after {_amount(self.timeout_s)} s ({_FIELD}); {cluster}")

    def _waiting_groups(self) -> list[str] | None:
        """Ids of the waiting placement groups of the run's shape; None when Ray cannot be asked right now."""
        from ray.util import placement_group_table

        try:
            table = placement_group_table()
        except Exception as e:  # noqa: BLE001 - only these log lines depend on it; asked again shortly
            log.debug("cannot list placement groups: %s", e)
            return None
        return [pg_id for pg_id, pg in table.items() if pg.get("state") in _WAITING_STATES and self._is_ours(pg)]

    def _is_ours(self, pg: dict) -> bool:
        bundles = list((pg.get("bundles") or {}).values())
        wanted = {k: float(v) for k, v in self.resources.items() if v}
        return len(bundles) == self.workers and all(
            {k: float(v) for k, v in b.items() if v} == wanted for b in bundles
        )
