"""Object-store settings that shard tasks, filter stages and training workers need in their own processes.

Ray workers inherit the environment of the process that started Ray, which may be a long-running
cluster started before the user exported an S3 endpoint or credentials. A job therefore hands the
standard AWS variables set in its driver to its remote work explicitly (as runtime_env env_vars).
Options given in the spec (`output.storage_options`) travel as task arguments instead.

A job submitted with `clipforge submit` receives its settings in a credentials file that every worker
process of the job reads itself (see job_credentials.py); those are not handed on again, because Ray's
task and actor listings show every runtime_env's env_vars.
"""
from __future__ import annotations

import os

FORWARDED_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)

# Names every worker process of this job sets itself (from the job's credentials file).
_reaching_workers_otherwise: set[str] = set()


def mark_reaching_workers(names: list[str]) -> None:
    """Record settings that every worker of this job receives without being handed them (see module doc)."""
    _reaching_workers_otherwise.update(names)


def forwarded_env(output_is_local: bool) -> dict[str, str]:
    """The driver's AWS settings for remote work on a non-local output (nothing for local outputs), less those
    the workers set themselves."""
    if output_is_local:
        return {}
    return {name: os.environ[name] for name in FORWARDED_VARIABLES
            if os.environ.get(name) and name not in _reaching_workers_otherwise}
