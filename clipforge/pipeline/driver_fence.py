"""`DriverFence` keeps a shard task from committing once the build's driver is gone, in the seconds
before Ray (or the local Ray's reaper, `clipforge.runtime.local_ray_reaper`) ends it: on the driver's own
host it compares the driver's pid and start time in /proc; elsewhere it asks a driver-owned actor, which
Ray ends with its owner.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from clipforge.runtime.proc_table import read_stat

_LIFELINE_TIMEOUT_S = 30.0


class DriverGone(RuntimeError):
    """The build's driver has ended: a shard task must not make anything visible any more."""


def _host_identity() -> str | None:
    """This boot of this machine, and this pid namespace: where a pid means the same process.

    None where /proc cannot tell (not Linux, or a /proc of another pid namespace than this process's).
    """
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    stat = read_stat(pid)
    return None if stat is None else stat.start_ticks


class _DriverLifeline:
    """A driver-owned actor: Ray ends it when its owner (the driver) ends."""

    def alive(self) -> bool:
        return True


def start_lifeline_actor() -> Any:
    """The actor that tells tasks on other hosts whether the driver lives (Ray must be up)."""
    import ray

    # No CPU reserved: it only answers pings, and must never wait behind the downloads for a CPU.
    return ray.remote(_DriverLifeline).options(num_cpus=0, max_restarts=0).remote()


def cluster_has_other_hosts() -> bool:
    """Whether any live node of the cluster is not this driver's (tasks may then run out of its /proc's sight)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return any(node["Alive"] and node["NodeID"] != here for node in ray.nodes())


@dataclass(frozen=True)
class DriverFence:
    """Travels with each shard task; `driver_alive()` says whether the build's driver still runs."""

    host: str | None
    pid: int
    started: int | None
    lifeline: Any = None  # a `_DriverLifeline` actor, for tasks on other hosts

    @classmethod
    def for_this_process(cls, lifeline: Any = None) -> "DriverFence":
        pid = os.getpid()
        host = _host_identity()
        started = _start_ticks(pid) if host else None
        return cls(host if started is not None else None, pid, started, lifeline)

    def driver_alive(self) -> bool:
        if self.host is not None and self.host == _host_identity():
            return _start_ticks(self.pid) == self.started
        if self.lifeline is None:
            # Another host and no actor to ask (a node that joined after the build started): Ray itself
            # ends the tasks of a job whose driver is gone, within moments.
            return True
        return _lifeline_answers(self.lifeline)


def _lifeline_answers(lifeline: Any) -> bool:
    import ray

    try:
        return ray.get(lifeline.alive.remote(), timeout=_LIFELINE_TIMEOUT_S)
    except ray.exceptions.ActorDiedError:
        return False
    except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
        return True  # slow or briefly unreachable is not dead; Ray ends the job's tasks if it is
