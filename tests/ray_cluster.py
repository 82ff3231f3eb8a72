"""A private Ray head (`ray start --head` on 127.0.0.1) for tests that submit jobs, and the command line
those tests drive (the `ray_head` fixture in conftest.py starts one head per test module).

The head runs in its own session and temp dir with its own ports, so other Ray instances on the machine
are neither reached nor stopped; teardown kills exactly the processes of that session and temp dir.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from ports import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLIENT_ENV = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
HEAD_START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 240


def cli(*args: str, env: dict | None = None, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process."""
    return subprocess.run([sys.executable, "-m", "clipforge", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or CLIENT_ENV, cwd=REPO)


def failed_job_logs(address: str, tail: int = 4000) -> str:
    """The end of each failed job's log on the head at `address`, for assertion messages: a child's own log says
    why it failed, where the client only sees Ray's one-line message."""
    from clipforge.cluster.submit import connect, job_logs, list_jobs

    client = connect(address)
    parts = []
    for job in list_jobs(client):
        if str(job.status).endswith("FAILED"):
            first = (job.message or "").splitlines()[:1]
            parts.append(f"--- {job.submission_id} ({first}):\n{job_logs(client, job.submission_id)[-tail:]}")
    return "\n".join(parts) or "(no failed jobs on the head)"


def _session_pids(sid: int, temp_dir: str) -> list[int]:
    """Processes of the head's session, plus any that run in or name its temp dir (job drivers start their own
    session, but run inside the temp dir's runtime_resources)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) == sid:
                pids.append(pid)
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except (OSError, ProcessLookupError):
            continue
        if temp_dir in cmdline or cwd.startswith(temp_dir):
            pids.append(pid)
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its children on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    for _ in range(2):
        for pid in _session_pids(proc.pid, temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    if proc.poll() is None:
        proc.wait(timeout=10)


def running_head() -> Iterator[str]:
    """Start a private Ray head (dashboard + job server) on 127.0.0.1, yield its dashboard URL, stop it."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - imported only to see whether it is installed
    except ImportError as e:
        pytest.skip(f"Ray's job server needs ray[default] ({e})")
    # A short temp dir: Ray's unix socket paths live under it and must stay short.
    temp_dir = tempfile.mkdtemp(prefix="cfhead-", dir="/tmp")
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
        "object-manager-port")}
    env = {**CLIENT_ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           # Job entrypoints run `python`: it must be this environment's.
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *[f"--{k}={v}" for k, v in ports.items()]]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/api/jobs/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head's job server did not come up in {HEAD_START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
