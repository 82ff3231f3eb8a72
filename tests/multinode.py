"""A Ray cluster of several nodes on 127.0.0.1 for tests (`clipforge.runtime.local_cluster`): a head with 0 CPUs
(scheduler, dashboard and job server), worker nodes of 1 CPU each, each with a custom resource naming it
(`clipforge_worker_1: 1`), and moto_server as the cluster's S3 store.

Tests marked `multinode` use the `multinode_cluster` fixture (one cluster per test module: start-up costs tens
of seconds; a test that kills nodes leaves as many alive as it found) or `running_cluster(root)` for a cluster
of their own. Either stops every process of the cluster when the module or block ends, also after a failure.
Drivers run in subprocesses (`run_driver`): the test process keeps its own session-wide local Ray (`ray_local`).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from clipforge.runtime.local_cluster import LocalCluster
from clipforge.runtime.remote_env import FORWARDED_VARIABLES

REPO = Path(__file__).resolve().parents[1]
DRIVER_TIMEOUT_S = 240
T = TypeVar("T")


@contextlib.contextmanager
def running_cluster(root: Path, workers: int = 2, cpus_per_worker: int = 1, s3: bool = True,
                    object_store_mb: int = 200) -> Iterator[LocalCluster]:
    """A head (0 CPUs) and `workers` worker nodes (with moto_server unless s3=False), stopped at exit."""
    cluster = LocalCluster.start(root, workers=workers, cpus_per_worker=cpus_per_worker, head_cpus=0, s3=s3,
                                 object_store_mb=object_store_mb)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def multinode_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    """Head + 2 worker nodes of 1 CPU + moto S3 for the tests of one module."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def client_env(cluster: LocalCluster, **extra: str) -> dict[str, str]:
    """This process's environment with every Ray and AWS setting replaced by the cluster's (for subprocesses)."""
    dropped = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "AWS_PROFILE", *FORWARDED_VARIABLES}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    return {**env, **cluster.client_env(), **extra}


def run_driver(cluster: LocalCluster, code: str, timeout: float = DRIVER_TIMEOUT_S) -> str:
    """Run `code` as a Ray driver connected to the cluster (in a fresh process); returns its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=client_env(cluster), cwd=REPO, timeout=timeout)
    assert result.returncode == 0, f"driver failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result.stdout


def last_json_line(stdout: str):
    """The last line of a driver's output, read as JSON (drivers print their results last)."""
    return json.loads(stdout.strip().splitlines()[-1])


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, pause_s: float = 0.5) -> T:
    """Call `probe` until it returns something other than None (or fail the test, naming `what`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not so after {timeout_s:g} s")
        time.sleep(pause_s)


def process_name(pid: int) -> str:
    """The command name of a live process ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
