"""What Linux's /proc says of live processes: parent, session and start time, one process or all of them.

Shared by the reaper of a private local Ray (`local_ray_reaper`), the local multi-node cluster's process
tracking (`local_cluster_processes`) and the build's driver fence (a pid with its start ticks names one
process for the whole boot, so a reused pid is never mistaken for the old process).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    """What /proc/PID/stat says of a live process."""

    ppid: int
    session: int
    start_ticks: int  # clock ticks after boot: with the pid, names one process for the whole boot


def read_stat(pid: int) -> ProcStat | None:
    """The stat of a live process; None when it is gone or has ended and waits to be reaped (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold anything
    if fields[0] in ("Z", "X"):
        return None
    return ProcStat(ppid=int(fields[1]), session=int(fields[3]), start_ticks=int(fields[19]))


def process_table() -> dict[int, ProcStat]:
    """{pid: stat} of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    return table


def environment_holds(pid: int, entry: bytes) -> bool:
    """Whether the environment /proc shows for `pid` holds `entry` (b"NAME=value"); False once it is gone or
    belongs to another user. A process that renames itself may overwrite what /proc shows there."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:
        return False
