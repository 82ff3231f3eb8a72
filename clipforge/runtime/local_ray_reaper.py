"""A private local Ray ends with the process that started it, however that process ends.

What Ray does by itself when the driver that started a local Ray (`ray_session` without an address)
is killed with SIGKILL:
- the GCS and the raylet die at once (Ray starts them with PR_SET_PDEATHSIG);
- workers notice their raylet is gone and exit within 1-3 s, finishing their current task meanwhile;
- the dashboard and runtime-env agents (children of the raylet, in the driver's process group) then try
  to report the raylet's death to the dead GCS and live about 60 s more. A kill of the whole process
  group takes them with it, but not the workers: each runs in a process group of its own.

`LocalRayReaper` closes that gap. It starts a small watchdog process (in a session of its own, so a
kill of the driver's process group does not reach it) holding the read end of a pipe whose only write
end the driver holds. The kernel closes that end when the driver exits, however it exits; the watchdog
then SIGKILLs every process of that Ray. It knows them by a token in their environment, which the
driver sets only while Ray starts (the raylet hands its environment to the agents and workers it
starts later), and, since a process that renames itself may overwrite what /proc shows of its
environment, by descent from a marked process, followed every few seconds while the job runs. On a
normal exit the driver closes the pipe itself after `ray.shutdown()` and waits for the watchdog, so
nothing of the job outlives it. `ray_session` uses it for every local Ray it starts.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from typing import Iterator

from clipforge.runtime.proc_table import ProcStat, environment_holds, process_table

TOKEN_VAR = "CLIPFORGE_LOCAL_RAY_TOKEN"
_REAP_ROUNDS = 20  # kill, look again: a process may start while its parent is being killed
_REAP_PAUSE_S = 0.05
_FIRST_SCAN_S = 0.25  # the watchdog looks for new processes of its Ray after this, then ever more rarely
_LAST_SCAN_EVERY_S = 2.0
_WATCHDOG_EXIT_S = 10.0


# -- the reaper of a private local Ray ---------------------------------------------------------------


class LocalRayReaper:
    """Context manager: every process started inside `marking()` ends when this driver ends, however it ends."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        read_end, self._lifeline = os.pipe()  # both non-inheritable: no other process holds the write end
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", __name__, self.token], stdin=read_end, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            os.close(self._lifeline)
            raise
        finally:
            os.close(read_end)

    @contextlib.contextmanager
    def marking(self) -> Iterator[None]:
        """Processes started in this block (and everything they start later) carry the token."""
        previous = os.environ.get(TOKEN_VAR)
        os.environ[TOKEN_VAR] = self.token
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(TOKEN_VAR, None)
            else:
                os.environ[TOKEN_VAR] = previous

    def close(self) -> None:
        """End whatever marked process is left and wait until that is done."""
        if self._lifeline < 0:
            return
        os.close(self._lifeline)
        self._lifeline = -1
        try:
            self._watchdog.wait(_WATCHDOG_EXIT_S)
        except subprocess.TimeoutExpired:
            self._watchdog.kill()
            self._watchdog.wait()

    def __enter__(self) -> "LocalRayReaper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Tracker:
    """The processes of one marked Ray: those carrying the token, and every descendant of theirs.

    Descendants count too because a process that renames itself (Ray's agents call setproctitle) may
    overwrite the memory /proc shows as its environment; their parent, the raylet, keeps the token.
    """

    def __init__(self, token: str):
        self.needle = f"{TOKEN_VAR}={token}".encode()
        self.seen: dict[tuple[int, int], bool] = {}  # (pid, start) -> carries the token (read once)
        self.tracked: dict[int, int] = {}  # pid -> start

    def scan(self) -> dict[int, ProcStat]:
        """Track the marked processes alive now and their descendants; returns the process table read."""
        table = process_table()
        me = os.getpid()
        children: dict[int, list[int]] = {}
        for pid, stat in table.items():
            children.setdefault(stat.ppid, []).append(pid)
        todo = [pid for pid, stat in table.items()
                if pid != me and (self.tracked.get(pid) == stat.start_ticks or self._marked(pid, stat.start_ticks))]
        while todo:
            pid = todo.pop()
            if pid != me:
                self.tracked[pid] = table[pid].start_ticks
                todo.extend(children.pop(pid, []))
        return table

    def _marked(self, pid: int, start: int) -> bool:
        key = (pid, start)
        if key not in self.seen:  # an environment is set once, at exec: read it once per process
            self.seen[key] = environment_holds(pid, self.needle)
        return self.seen[key]

    def alive(self, table: dict[int, ProcStat]) -> list[int]:
        return [pid for pid, start in self.tracked.items() if pid in table and table[pid].start_ticks == start]


def end_tracked(tracker: _Tracker) -> None:
    """SIGKILL every tracked process until none is left (a parent being killed may still start a child)."""
    for _ in range(_REAP_ROUNDS):
        pids = tracker.alive(tracker.scan())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(_REAP_PAUSE_S)


def _watch(token: str) -> None:
    """The watchdog: follow the marked processes until the lifeline ends (EOF on stdin), then end them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not cut the cleanup
    tracker = _Tracker(token)
    lifeline = sys.stdin.fileno()
    every = _FIRST_SCAN_S
    while True:
        ready, _, _ = select.select([lifeline], [], [], every)
        if ready and not os.read(lifeline, 4096):
            break
        tracker.scan()
        # Ray starts its daemons in the first seconds; after that, new processes are mostly workers,
        # which keep the token where /proc shows it: scan more rarely (a scan reads every process's stat).
        every = min(2 * every, _LAST_SCAN_EVERY_S)
    end_tracked(tracker)


if __name__ == "__main__":
    _watch(sys.argv[1])
