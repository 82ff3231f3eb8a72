"""A real S3 API for tests: moto_server on a loopback port, and clients configured for it.

The `moto_endpoint` fixture in conftest.py starts one server per test session.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ports import free_port

REGION = "us-east-1"
KEY_ID, SECRET = "testing-key", "testing-secret"


def start_moto(timeout_s: float = 90) -> tuple[subprocess.Popen, str]:
    """(process, endpoint URL) of a moto_server that accepts connections."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def storage_options(endpoint: str) -> dict:
    """fsspec/s3fs options reaching the test server with the test credentials."""
    return {"endpoint_url": endpoint, "key": KEY_ID, "secret": SECRET, "client_kwargs": {"region_name": REGION},
            # Never reuse a filesystem object cached with other settings by an earlier test.
            "skip_instance_cache": True}


def s3fs_for(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(**storage_options(endpoint))


def new_bucket(endpoint: str) -> str:
    name = f"clipforge-{uuid.uuid4().hex[:10]}"
    s3fs_for(endpoint).call_s3("create_bucket", Bucket=name)
    return name


def use_s3_from_environment(mp, endpoint: str) -> None:
    """Point every AWS client at `endpoint` through the environment only (as users configure S3), with no
    profile, credentials file or instance metadata that could stand in for these settings. `mp`: a pytest
    MonkeyPatch, which restores the environment afterwards."""
    from clipforge.runtime.remote_env import FORWARDED_VARIABLES

    for name in FORWARDED_VARIABLES + ("AWS_PROFILE",):
        mp.delenv(name, raising=False)
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", KEY_ID),
                        ("AWS_SECRET_ACCESS_KEY", SECRET), ("AWS_DEFAULT_REGION", REGION),
                        ("AWS_CONFIG_FILE", "/nonexistent"), ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):
        mp.setenv(name, value)
