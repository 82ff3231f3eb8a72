"""Finding and ending every process of one node of a local Ray cluster (`local_cluster.py`), from /proc.

Each node is one `ray start --block` process started in a session of its own, with a token in its
environment. A process belongs to the node when it
- carries the node's token in its environment (the raylet hands its environment to the agents and workers it
  starts, and the job supervisor to the job drivers it starts);
- is in the node's session: the session of the `ray start` process while that process lives, or any session one
  of whose members carries the token (a session id is not reused while a member lives, so such a session is
  the node's, including members that renamed themselves and so overwrote what /proc shows of their environment);
- names the node's temp dir as a Ray option (`--temp-dir=DIR`, `--session-dir=DIR/...`, ...) or runs in a job
  working dir unpacked under it (`DIR/session_*/runtime_resources/...`): job drivers start sessions of their own;
- or descends from a process found so far (followed across scans, so a child whose parent was just killed and
  which was re-parented to init is still known).
A shell or `tail -f` of a user that merely looks at the node's logs is none of these.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from clipforge.runtime.proc_table import ProcStat, environment_holds, process_table, read_stat

TOKEN_VAR = "CLIPFORGE_LOCAL_CLUSTER_NODE"
_KILL_ROUNDS = 40  # kill, look again: a parent being killed may still start a child
_KILL_PAUSE_S = 0.1


@dataclass(frozen=True)
class NodeMark:
    """How the processes of one node are recognised."""

    token: str  # value of TOKEN_VAR in the environment of the node's processes
    temp_dir: str | None  # the node's Ray temp dir (absolute, unique to the node); None: not a Ray node
    leader_pid: int | None = None  # the `ray start` process: pid and start ticks (its session id is its pid)
    leader_start: int | None = None


def _self_and_ancestors(table: dict[int, ProcStat]) -> set[int]:
    chain, pid = set(), os.getpid()
    while pid in table and pid not in chain:
        chain.add(pid)
        pid = table[pid].ppid
    return chain | {os.getpid()}


def is_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether `pid` runs (and, given its start ticks, is still the same process)."""
    stat = read_stat(pid)
    return stat is not None and (start_ticks is None or stat.start_ticks == start_ticks)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone meanwhile, or another user's
        return b""


# The options by which Ray hands a process its node's temp dir (or a folder inside it).
_DIR_OPTIONS = ("--temp-dir=", "--temp_dir=", "--session-dir=", "--session_dir=", "--ray_session_dir=")


def _names_dir(pid: int, temp_dir: str) -> bool:
    """Whether the process was given `temp_dir` as a Ray option, or runs in a job working dir under it."""
    inside = temp_dir + "/"
    for arg in _read(f"/proc/{pid}/cmdline").decode(errors="replace").split("\0"):
        for option in _DIR_OPTIONS:
            if arg.startswith(option) and (arg[len(option):] == temp_dir or arg[len(option):].startswith(inside)):
                return True
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    parts = cwd[len(inside):].split("/") if cwd.startswith(inside) else []
    return len(parts) > 1 and parts[0].startswith("session_") and parts[1] == "runtime_resources"


class NodeTracker:
    """The processes of one node found so far; `alive()` scans /proc for more (see the module doc)."""

    def __init__(self, mark: NodeMark):
        self.mark = mark
        self._needle = f"{TOKEN_VAR}={mark.token}".encode()
        self._seen: dict[tuple[int, int], tuple[bool, bool]] = {}  # (pid, start) -> (carries token, names dir)
        self.tracked: dict[int, int] = {}  # pid -> start ticks

    def _marks(self, pid: int, start: int) -> tuple[bool, bool]:
        key = (pid, start)
        if key not in self._seen:  # environment and options are set at exec: read them once per process
            carries = environment_holds(pid, self._needle)
            temp_dir = self.mark.temp_dir
            names_dir = temp_dir is not None and not carries and _names_dir(pid, temp_dir)
            self._seen[key] = (carries, names_dir)
        return self._seen[key]

    def _own_sessions(self, table: dict[int, ProcStat], carriers: set[int]) -> set[int]:
        """The sessions of the recorded leader and of the token carriers. A carrier's session counts only while
        its leader is gone or is the node's too: the token is only ever set on a process that starts a session
        of its own, so a live leader without it means the token reached someone else's session."""
        sessions = set()
        leader = self.mark.leader_pid
        if leader is not None and leader in table and table[leader].start_ticks == self.mark.leader_start:
            sessions.add(leader)
        for pid in carriers:
            session = table[pid].session
            if session not in table or session in carriers or self.tracked.get(session) == table[session].start_ticks:
                sessions.add(session)
        return sessions

    def scan(self) -> dict[int, ProcStat]:
        """Track the node's processes alive now; returns the process table read."""
        table = process_table()
        spared = _self_and_ancestors(table)  # whoever looks for the node's processes is never one of them
        roots, carriers = [], set()
        for pid, st in table.items():
            if pid in spared:
                continue
            carries, names_dir = self._marks(pid, st.start_ticks)
            if carries:
                carriers.add(pid)
            if carries or names_dir or self.tracked.get(pid) == st.start_ticks:
                roots.append(pid)
        sessions = self._own_sessions(table, carriers)
        children: dict[int, list[int]] = {}
        for pid, st in table.items():
            children.setdefault(st.ppid, []).append(pid)
        todo = roots + [pid for pid, st in table.items() if st.session in sessions]
        while todo:
            pid = todo.pop()
            if pid not in spared:
                self.tracked[pid] = table[pid].start_ticks
                todo.extend(children.pop(pid, []))
        return table

    def alive(self) -> list[int]:
        """The tracked processes that still run, after a fresh scan."""
        table = self.scan()
        return sorted(pid for pid, start in self.tracked.items()
                      if pid in table and table[pid].start_ticks == start)


def node_pids(mark: NodeMark) -> list[int]:
    """The pids of the node's processes alive now."""
    return NodeTracker(mark).alive()


def kill_all(trackers: list[NodeTracker]) -> list[int]:
    """SIGKILL every process of these nodes until none is left; returns every pid killed."""
    killed: set[int] = set()
    for _ in range(_KILL_ROUNDS):
        pids = [pid for tracker in trackers for pid in tracker.alive()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(_KILL_PAUSE_S)
    return sorted(killed)


def terminate(pid: int, start_ticks: int | None) -> bool:
    """SIGTERM one process if it is still the one meant; returns whether a signal was sent."""
    if not is_alive(pid, start_ticks):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
        return True
    return False


def wait_gone(processes: list[tuple[int, int | None]], timeout_s: float) -> bool:
    """Wait until none of (pid, start ticks) runs; returns whether that happened within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(is_alive(pid, start) for pid, start in processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
