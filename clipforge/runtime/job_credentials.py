"""Object-store settings that `clipforge submit` hands to a job on a Ray cluster without any listing showing them.

What Ray 2.60 shows of env_vars (measured on `ray start --head`: a job submitted with a marker value in its
runtime_env's env_vars, whose driver started a task and an actor each with another marker in theirs):
  - the job's values: in `/api/jobs/` and `/api/jobs/ID` (so `ray job list`), `/api/v0/jobs` (`ray list jobs`),
    `/api/v0/actors?detail=true` (its JobSupervisor actor's serialized runtime_env), `/api/v0/tasks?detail=true`
    (every task and actor-creation task of the job inherits them) and `/api/v0/runtime_envs` while it runs;
  - a task's or actor's own values (a task's `runtime_env`, Ray Train's `worker_runtime_env`): in the task
    listing, the actor listing (for an actor), `/api/v0/runtime_envs`;
  - all of them, plainly, in the head's `runtime_env_agent.log`, which the dashboard's logs view
    (`/api/v0/logs/file`) serves as is.
The dashboard's JSON views redact env_vars values for browsers (RAY_DASHBOARD_REDACT_RUNTIME_ENV) but not for
API clients: the `ray` CLI, scripts, `requests`. No value shows in `/nodes?view=summary` (workers' command
lines), `/logical/actors`, the worker, node and placement-group listings, `/events`, the job's driver info,
the job's logs, `ray job status` or `clipforge jobs list|status|logs`.

So the settings never enter a runtime_env. `clipforge submit` writes them to CREDENTIALS_FILE, mode 0600,
inside the job's working_dir: Ray uploads that folder as a package to its internal store, unpacks it on
every node that runs part of the job (file modes kept) and lists only the package's name. The job's
entrypoint (`clipforge run ... --credentials-file CREDENTIALS_FILE`) sets them in the driver's environment
before the job starts, and WORKER_SETUP_HOOK, the job's `worker_process_setup_hook` (the listings show its
module path only), sets them in every worker process of the job, which starts in its node's copy of the
working_dir. Both record the names they set (remote_env.mark_reaching_workers), so that no job hands them
on again through a runtime_env. Measured the same way, a submitted build and a submitted training run writing
to S3 with forwarded settings leave no value in any of the places above (tests/e2e/test_submit_credentials.py
checks them all). The file stays in each node's copy of the working_dir, readable by Ray's user only, until
Ray removes that copy from its cache.

The client's AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE and AWS_CONFIG_FILE name files on the client, which
the cluster's nodes do not have (a profile a node lacks even stops botocore there): submit resolves the
profile's credentials and region here, with botocore, and hands on the resulting values instead.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from clipforge.errors import UserError
from clipforge.runtime.remote_env import FORWARDED_VARIABLES, mark_reaching_workers

log = logging.getLogger(__name__)

# The folder clipforge adds to a submitted job's working_dir (the shipped spec lives there too).
JOB_DIR = ".clipforge-job"
CREDENTIALS_FILE = f"{JOB_DIR}/credentials.json"
WORKER_SETUP_HOOK = f"{__name__}.apply_in_worker"

# The settings a job may receive: the ones local runs forward to their workers.
OBJECT_STORE_VARIABLES = FORWARDED_VARIABLES
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Credential sources that are this machine's own identity (instance metadata, a container role, a pod's web
# identity token), never the user's: a cluster node has its own, and asking the metadata service from a laptop
# only waits for its timeouts.
_MACHINE_PROVIDERS = ("iam-role", "container-role", "assume-role-with-web-identity")


class JobCredentialsError(UserError):
    """The object-store settings to hand a job cannot be resolved or read; the message names the profile or file."""


@dataclass(frozen=True)
class ClientSettings:
    """The object-store settings of this process, ready to hand to a job on a cluster."""

    values: dict[str, str] = field(default_factory=dict)
    # Where the credentials came from when not from AWS_* variables, e.g. "AWS profile `dev`".
    resolved_from: str | None = None


def client_settings() -> ClientSettings:
    """This process's AWS_* object-store settings, with the credentials and region of its AWS profile (or shared
    credentials file) resolved into values when no keys are set in the environment."""
    values = {name: os.environ[name] for name in OBJECT_STORE_VARIABLES if os.environ.get(name)}
    if "AWS_ACCESS_KEY_ID" in values:  # botocore prefers keys in the environment over any profile, too
        return ClientSettings(values)
    profile_values, profile = _profile_settings()
    for name, value in profile_values.items():
        values.setdefault(name, value)
    return ClientSettings(values, profile if profile_values.keys() & set(SECRET_VARIABLES) else None)


def _profile_settings() -> tuple[dict[str, str], str]:
    """(settings, profile description) from the AWS profile botocore would use here; nothing found is no error."""
    # botocore (installed with s3fs) ships neither types nor stubs.
    import botocore.credentials  # type: ignore[import-untyped]  # untyped: see above
    import botocore.exceptions  # type: ignore[import-untyped]  # untyped: see above
    import botocore.session  # type: ignore[import-untyped]  # untyped: see above

    session = botocore.session.Session()
    name = session.get_config_variable("profile") or "default"
    profile = f"AWS profile `{name}`"
    try:
        resolver = botocore.credentials.create_credential_resolver(session)
        for provider in _MACHINE_PROVIDERS:
            resolver.remove(provider)
        credentials = resolver.load_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
        config = session.get_scoped_config()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:  # ClientError: STS refused
        raise JobCredentialsError(f"{profile}: {e}; fix it, or pass --no-forward-credentials when the "
                                  "cluster has credentials of its own") from None
    values: dict[str, str] = {}
    if frozen is not None and frozen.access_key and frozen.secret_key:
        values.update(AWS_ACCESS_KEY_ID=frozen.access_key, AWS_SECRET_ACCESS_KEY=frozen.secret_key)
        if frozen.token:
            values["AWS_SESSION_TOKEN"] = frozen.token
    if config.get("region") and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        values["AWS_DEFAULT_REGION"] = str(config["region"])
    if config.get("endpoint_url"):
        values["AWS_ENDPOINT_URL"] = str(config["endpoint_url"])
    return values, profile


def write_credentials_file(working_dir: Path, values: Mapping[str, str]) -> str:
    """Write `values` to CREDENTIALS_FILE in `working_dir`, readable by its owner only; returns that relative path."""
    path = working_dir / CREDENTIALS_FILE
    path.parent.mkdir(exist_ok=True)
    # Created with its final mode: the values are never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dict(values), f)
    return CREDENTIALS_FILE


def read_credentials_file(path: str | Path) -> dict[str, str]:
    """The settings in a credentials file; only OBJECT_STORE_VARIABLES may be set by it."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise JobCredentialsError(f"credentials file {path}: cannot read it ({e.strerror or e})") from None
    except ValueError:
        raise JobCredentialsError(f"credentials file {path}: not JSON; it is written by `clipforge submit`") from None
    if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
        raise JobCredentialsError(f"credentials file {path}: expected an object of variable names to strings")
    unknown = sorted(set(values) - set(OBJECT_STORE_VARIABLES))
    if unknown:
        raise JobCredentialsError(f"credentials file {path}: sets {', '.join(unknown)}; it may set only "
                                  f"object-store settings ({', '.join(OBJECT_STORE_VARIABLES)})")
    return values


def apply_credentials_file(path: str | Path) -> list[str]:
    """Set the file's settings in this process's environment (over any the node has: the job was handed them);
    returns their names."""
    values = read_credentials_file(path)
    os.environ.update(values)
    mark_reaching_workers(sorted(values))
    return sorted(values)


def apply_in_worker() -> None:
    """Ray worker-process setup hook of submitted jobs: the job's settings from its working_dir (the worker's cwd)."""
    path = Path.cwd() / CREDENTIALS_FILE
    if not path.is_file():  # a process without the job's working_dir: it keeps the node's own settings
        log.warning("%s is not in this worker's working dir %s; object-store access uses the node's own settings",
                    CREDENTIALS_FILE, Path.cwd())
        return
    apply_credentials_file(path)

