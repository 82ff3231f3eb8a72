"""Finding the processes of one local-cluster node in /proc (`clipforge.runtime.local_cluster_processes`), with
plain Python processes standing in for a node's: what belongs to the node is found and killed, whatever merely
looks at its folders is left alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from clipforge.runtime.local_cluster_processes import TOKEN_VAR, NodeMark, NodeTracker, is_alive, kill_all
from clipforge.runtime.proc_table import read_stat

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# The node's `ray start` stand-in: starts a child that drops its environment (as a renamed process may seem to),
# a grandchild in a session of its own that keeps the token (a job driver), then prints their pids and waits.
LEADER = """
import os, subprocess, sys, time
bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env={})
driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(bare.pid, driver.pid, flush=True)
time.sleep(120)
"""
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def spawned():
    procs: list[subprocess.Popen] = []

    def spawn(cmd, **kwargs) -> subprocess.Popen:
        procs.append(subprocess.Popen(cmd, **kwargs))
        return procs[-1]

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait()


def _wait_started(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while not all(is_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, pids
        time.sleep(0.05)


def test_tracker_finds_the_nodes_processes_and_kill_all_ends_only_them(spawned, tmp_path):
    temp_dir = tmp_path / "node"
    (temp_dir / "session_1" / "runtime_resources" / "job").mkdir(parents=True)
    token = uuid.uuid4().hex
    env = {**os.environ, TOKEN_VAR: token}
    leader = spawned([sys.executable, "-c", LEADER], env=env, stdout=subprocess.PIPE, text=True,
                     start_new_session=True)
    assert leader.stdout is not None
    bare, driver = (int(pid) for pid in leader.stdout.readline().split())
    # Started elsewhere, without the token: named by a Ray option, or running in a job working dir.
    by_option = spawned([*SLEEP, f"--temp-dir={temp_dir}"], start_new_session=True)
    in_job_dir = spawned(SLEEP, cwd=temp_dir / "session_1" / "runtime_resources" / "job", start_new_session=True)
    # A user's shell in the node's folder and a `tail -f` of one of its logs: not the node's.
    looking = spawned([*SLEEP, str(temp_dir / "session_1" / "raylet.out")], cwd=temp_dir, start_new_session=True)
    other_token = spawned(SLEEP, env={**os.environ, TOKEN_VAR: uuid.uuid4().hex}, start_new_session=True)
    ours = [leader.pid, bare, driver, by_option.pid, in_job_dir.pid]
    _wait_started(ours + [looking.pid, other_token.pid])

    stat = read_stat(leader.pid)
    assert stat is not None and stat.session == leader.pid
    mark = NodeMark(token=token, temp_dir=str(temp_dir), leader_pid=leader.pid, leader_start=stat.start_ticks)
    tracker = NodeTracker(mark)
    assert tracker.alive() == sorted(ours)

    killed = kill_all([tracker])

    assert sorted(killed) == sorted(ours)
    assert not any(is_alive(pid) for pid in ours)
    assert is_alive(looking.pid) and is_alive(other_token.pid)


def test_a_child_is_still_found_after_its_parent_was_killed(spawned, tmp_path):
    token = uuid.uuid4().hex
    leader = spawned([sys.executable, "-c", LEADER], env={**os.environ, TOKEN_VAR: token}, stdout=subprocess.PIPE,
                     text=True, start_new_session=True)
    assert leader.stdout is not None
    bare, _driver = (int(pid) for pid in leader.stdout.readline().split())
    _wait_started([bare])
    tracker = NodeTracker(NodeMark(token=token, temp_dir=str(tmp_path)))  # no leader known: by token only
    assert bare in tracker.alive()
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait()
    # `bare` shows no token and now has another parent; only having been tracked before tells it is the node's.
    assert bare in tracker.alive()
    assert bare not in NodeTracker(NodeMark(token=token, temp_dir=str(tmp_path))).alive()
    assert bare in kill_all([tracker])
    assert not is_alive(bare)


def test_a_leader_known_only_by_pid_counts_only_while_its_start_time_matches(spawned, tmp_path):
    proc = spawned(SLEEP, start_new_session=True)
    _wait_started([proc.pid])
    stat = read_stat(proc.pid)
    assert stat is not None
    right = NodeMark(token="none", temp_dir=str(tmp_path), leader_pid=proc.pid, leader_start=stat.start_ticks)
    wrong = NodeMark(token="none", temp_dir=str(tmp_path), leader_pid=proc.pid, leader_start=stat.start_ticks + 1)
    assert NodeTracker(right).alive() == [proc.pid]
    assert NodeTracker(wrong).alive() == []  # a reused pid is another process


# A shell of someone else's (its own session, no token) that started one process carrying the token, and another.
FOREIGN_SHELL = """
import os, subprocess, sys, time
marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env={**os.environ, %r: %r})
plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(marked.pid, plain.pid, flush=True)
time.sleep(120)
"""


def test_a_token_in_someone_elses_live_session_does_not_make_that_session_the_nodes(spawned, tmp_path):
    token = uuid.uuid4().hex
    shell = spawned([sys.executable, "-c", FOREIGN_SHELL % (TOKEN_VAR, token)], stdout=subprocess.PIPE, text=True,
                    start_new_session=True)
    assert shell.stdout is not None
    marked, plain = (int(pid) for pid in shell.stdout.readline().split())
    _wait_started([marked, plain])
    tracker = NodeTracker(NodeMark(token=token, temp_dir=str(tmp_path)))
    assert tracker.alive() == [marked]
    assert kill_all([tracker]) == [marked]
    assert is_alive(shell.pid) and is_alive(plain)
