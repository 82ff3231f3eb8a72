"""Submitting job specs to a running Ray cluster through Ray's Job Submission API, and
following, listing and stopping those jobs.

A submitted job runs `python -m clipforge run spec.yaml` on the cluster. The validated spec
is shipped in the job's working_dir: a staging folder holding the spec alone, or, with a
user working dir, the user's files (linked, not copied) plus `.clipforge-job/spec.yaml`.

The client's object-store settings (AWS_* variables, or its AWS profile resolved into values) travel
in `.clipforge-job/credentials.json` of the same working_dir, never in the job's runtime_env, which
Ray's job, actor and task listings show whole: see clipforge/runtime/job_credentials.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import os
import secrets
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from clipforge import __version__
from clipforge.cluster.kuberay import cluster_spec_text, dns1123_name
from clipforge.errors import UserError
from clipforge.runtime.job_credentials import JOB_DIR, WORKER_SETUP_HOOK, client_settings, write_credentials_file

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD_PORT = 8265
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Re-include the shipped spec (and credentials file) even when the user's ignore files or `excludes` would drop it.
_REINCLUDE = [f"!/{JOB_DIR}", f"!/{JOB_DIR}/**"]


class ClusterError(UserError):
    """The cluster cannot be reached or refused a request; the message is one line meant for the user."""


def resolve_address(address: str | None) -> str:
    """The dashboard's HTTP URL from `--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS.

    Accepts http(s)://HOST[:PORT], HOST[:PORT] and ray://HOST[:PORT] (whose dashboard is HOST:8265).
    """
    raw = address
    if not raw:
        raw = next((os.environ[v] for v in ADDRESS_ENV_VARS if os.environ.get(v)), None)
    if not raw:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    raw = raw.strip().rstrip("/")
    if raw == "auto":
        raise ClusterError("address 'auto' names no dashboard; pass the dashboard URL, e.g. http://HEAD:8265")
    text = raw if "://" in raw else f"http://{raw}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ClusterError(f"bad cluster address {raw!r}: {e}") from None
    if parts.scheme not in ("http", "https", "ray") or not parts.hostname:
        raise ClusterError(f"bad cluster address {raw!r}: expected http(s)://HOST:PORT, e.g. http://HEAD:8265")
    if parts.path not in ("", "/"):
        raise ClusterError(f"bad cluster address {raw!r}: the dashboard URL has no path")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if parts.scheme == "ray":
        return f"http://{host}:{DEFAULT_DASHBOARD_PORT}"
    return f"{parts.scheme}://{host}:{port or DEFAULT_DASHBOARD_PORT}"


def _describe_request_error(url: str, err: Exception) -> str:
    import requests

    text = str(err)
    if isinstance(err, requests.exceptions.Timeout):
        return f"cannot reach the Ray cluster at {url}: no answer (timed out)"
    if isinstance(err, requests.exceptions.SSLError):
        return f"cannot reach the Ray cluster at {url}: TLS error ({type(err).__name__})"
    if isinstance(err, requests.exceptions.ConnectionError):
        if "Name or service not known" in text or "NameResolutionError" in text or "nodename nor servname" in text:
            reason = "unknown host"
        elif "Connection refused" in text:
            reason = "connection refused"
        else:
            reason = "connection failed"
        return f"cannot reach the Ray cluster at {url}: {reason} (is the head up and its dashboard port open?)"
    return f"cannot reach the Ray cluster at {url}: {type(err).__name__}"


def check_dashboard(url: str, timeout_s: float = 10.0) -> str:
    """Probe the dashboard's version endpoint with a timeout (Ray's client waits forever); returns its Ray version."""
    import requests

    try:
        r = requests.get(f"{url}/api/version", timeout=(timeout_s, timeout_s))
    except requests.exceptions.RequestException as e:
        raise ClusterError(_describe_request_error(url, e)) from None
    if r.status_code != 200:
        raise ClusterError(f"{url} answered HTTP {r.status_code} to /api/version: not a Ray dashboard?")
    try:
        return str(r.json()["ray_version"])
    except (ValueError, KeyError, TypeError):
        raise ClusterError(f"{url} is not a Ray dashboard (unexpected answer to /api/version)") from None


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    # Ray's client lets RAY_ADDRESS override an explicit address; the address we resolved must win.
    saved = {v: os.environ.pop(v) for v in ADDRESS_ENV_VARS if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def cluster_errors(url: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the job client's exceptions into one-line ClusterErrors."""
    import requests

    try:
        yield
    except ClusterError:
        raise
    except requests.exceptions.RequestException as e:
        raise ClusterError(_describe_request_error(url, e)) from None
    except ConnectionError as e:
        raise ClusterError(f"lost the connection to the Ray cluster at {url}: {e}") from None
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if job_id and ("404" in first or "does not exist" in first):
            raise ClusterError(f"no job {job_id!r} on the Ray cluster at {url}") from None
        raise ClusterError(f"the Ray cluster at {url} refused the request: {first}") from None


def connect(address: str | None = None, timeout_s: float = 10.0):
    """A JobSubmissionClient for the cluster, or a ClusterError naming why it cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    check_dashboard(url, timeout_s)
    with cluster_errors(url), _without_address_env():
        return JobSubmissionClient(url)


def check_runtime_env(spec) -> None:
    """Ray's own checks of `ray.runtime_env` (types, local paths), before anything is staged or sent."""
    from ray.runtime_env import RuntimeEnv

    env = {k: v for k, v in spec.ray.runtime_env.items() if k != "working_dir"}  # replaced by the staging dir
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        raise ClusterError(f"field `ray.runtime_env`: {e}") from None


def _with_reinclude(patterns: list[str]) -> list[str]:
    return [*patterns, *_REINCLUDE]


def _stage_user_dir(user_dir: Path, staging: Path) -> None:
    """Mirror `user_dir` into `staging` with symlinks (Ray's packer follows them), ignore files amended to
    keep the shipped spec."""
    if (user_dir / JOB_DIR).exists():
        raise ClusterError(f"{user_dir}: has a `{JOB_DIR}` entry, which clipforge reserves for the shipped spec")
    for entry in user_dir.iterdir():
        if entry.name in (".gitignore", ".rayignore") and entry.is_file():
            lines = entry.read_text(encoding="utf-8", errors="replace").splitlines()
            (staging / entry.name).write_text("\n".join(_with_reinclude(lines)) + "\n", encoding="utf-8")
        else:
            (staging / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def forwarded_settings(spec, settings: Mapping[str, str]) -> dict[str, str]:
    """The object-store settings to hand the job: `settings` less those the spec's `ray.runtime_env.env_vars`
    sets itself (the spec's own values win, as on a local run)."""
    own = set((spec.ray.runtime_env.get("env_vars") or {}).keys())
    return {name: value for name, value in settings.items() if name not in own}


def _credentials_channel(runtime_env: dict[str, Any], staging: Path, credentials: Mapping[str, str]) -> str:
    """Ship `credentials` in the staging folder for the job's driver and workers; returns the entrypoint's option."""
    if runtime_env.get("worker_process_setup_hook"):
        raise ClusterError(
            "field `ray.runtime_env.worker_process_setup_hook`: clipforge's own setup hook hands the forwarded "
            "object-store settings to the job's workers; leave the field out, or pass --no-forward-credentials")
    runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    return f" --credentials-file {shlex.quote(write_credentials_file(staging, credentials))}"


@contextlib.contextmanager
def staged_job(spec, working_dir: str | Path | None = None,
               credentials: Mapping[str, str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(entrypoint, runtime_env) for a spec; the staging folder lives until the job has been submitted
    (the client uploads it during `submit_job`). `credentials`: object-store settings for the job, shipped in a
    file of the working_dir that only the job reads (none by default)."""
    runtime_env = copy.deepcopy(spec.ray.runtime_env)
    spec_wd = runtime_env.pop("working_dir", None)
    user_dir = working_dir if working_dir is not None else spec_wd
    if user_dir is not None and "://" in str(user_dir):
        raise ClusterError(
            f"working_dir {user_dir!r} is a remote package; clipforge must add the spec to the job's files. "
            "Pass a local folder with --working-dir, or leave it out"
        )
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    runtime_env["env_vars"] = env_vars
    if runtime_env.get("excludes"):
        runtime_env["excludes"] = _with_reinclude(list(runtime_env["excludes"]))
    with tempfile.TemporaryDirectory(prefix="clipforge-submit-") as tmp:
        staging = Path(tmp) / "job"
        staging.mkdir()
        if user_dir is None:
            spec_rel = "spec.yaml"
        else:
            src = Path(user_dir).expanduser()
            if not src.is_dir():
                raise ClusterError(f"working dir {str(user_dir)!r} is not a folder")
            _stage_user_dir(src.resolve(), staging)
            spec_rel = f"{JOB_DIR}/spec.yaml"
            (staging / JOB_DIR).mkdir()
        (staging / spec_rel).write_text(cluster_spec_text(spec), encoding="utf-8")
        options = _credentials_channel(runtime_env, staging, credentials) if credentials else ""
        runtime_env["working_dir"] = str(staging)
        yield f"python -m clipforge run {shlex.quote(spec_rel)}{options}", runtime_env


def new_submission_id(spec) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"clipforge-{dns1123_name(spec.name, 30)}-{stamp}-{secrets.token_hex(3)}"


def job_metadata(spec) -> dict[str, str]:
    digest = hashlib.sha256(cluster_spec_text(spec).encode()).hexdigest()[:16]
    return {"clipforge.kind": spec.kind, "clipforge.name": spec.name, "clipforge.version": __version__,
            "clipforge.spec_sha256": digest}


def submit_spec(client, spec, *, working_dir: str | Path | None = None, submission_id: str | None = None,
                entrypoint_num_cpus: float = 0.0, entrypoint_num_gpus: float = 0.0, agent_wait_s: float = 60.0,
                credentials: Mapping[str, str] | None = None) -> str:
    """Submit a validated spec; returns the submission id. The job's driver reserves `entrypoint_num_*`
    (0 by default: the driver only coordinates, its workers reserve what the spec's `scaling` says).
    `credentials`: the object-store settings to hand the job (default: this process's, `client_settings()`;
    `{}` hands none), less those the spec sets itself."""
    check_runtime_env(spec)
    job_id = submission_id or new_submission_id(spec)
    settings = client_settings().values if credentials is None else credentials
    staged = staged_job(spec, working_dir, forwarded_settings(spec, settings))
    with staged as (entrypoint, runtime_env), cluster_errors(client.get_address()):
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return client.submit_job(
                    entrypoint=entrypoint,
                    runtime_env=runtime_env,
                    submission_id=job_id,
                    metadata=job_metadata(spec),
                    entrypoint_num_cpus=entrypoint_num_cpus or None,
                    entrypoint_num_gpus=entrypoint_num_gpus or None,
                )
            except RuntimeError as e:
                # A head that has just started answers before its job agent is up; that passes by itself.
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                log.info("the cluster's job agent is not ready yet; retrying the submission")
                time.sleep(2.0)


def job_info(client, job_id: str):
    with cluster_errors(client.get_address(), job_id):
        return client.get_job_info(job_id)


def job_status(client, job_id: str) -> str:
    return str(job_info(client, job_id).status.value)


def list_jobs(client) -> list:
    with cluster_errors(client.get_address()):
        return sorted(client.list_jobs(), key=lambda j: j.start_time or 0)


def job_logs(client, job_id: str) -> str:
    with cluster_errors(client.get_address(), job_id):
        return client.get_job_logs(job_id)


def wait_for_job(client, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0,
                 on_status: Callable[[str], None] | None = None) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or `timeout_s` passes); returns the last status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        status = job_status(client, job_id)
        if status != last and on_status:
            on_status(status)
        last = status
        if status in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
            return status
        time.sleep(poll_s)


def follow_logs(client, job_id: str, write: Callable[[str], Any]) -> str:
    """Stream the job's logs until it ends; returns its final status."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    url = client.get_address()
    job_info(client, job_id)  # a clear "no job" error before opening the log stream
    try:
        asyncio.run(_tail())
    except Exception as e:  # noqa: BLE001 - a dropped stream is fine if the job has ended meanwhile
        status = job_status(client, job_id)
        if status not in TERMINAL:
            raise ClusterError(f"the log stream of job {job_id!r} from {url} broke off: "
                               f"{str(e).strip() or type(e).__name__}") from None
        return status
    return wait_for_job(client, job_id, timeout_s=30)


def stop_job(client, job_id: str, *, wait_s: float = 30.0) -> str:
    """Ask the cluster to stop the job and wait (up to `wait_s`) until it has; returns its status."""
    with cluster_errors(client.get_address(), job_id):
        job_info(client, job_id)
        client.stop_job(job_id)
    return wait_for_job(client, job_id, timeout_s=wait_s, poll_s=0.5)
