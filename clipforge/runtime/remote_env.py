"""Object-store settings that shard tasks and filter stages need in their own processes.

Ray workers inherit the environment of the process that started Ray, which may be a long-running
cluster started before the user exported an S3 endpoint or credentials. The build therefore hands
the standard AWS variables set in the driver to its remote work explicitly (as runtime_env
env_vars). Options given in the spec (`output.storage_options`) travel as task arguments instead.
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


def forwarded_env(output_is_local: bool) -> dict[str, str]:
    """The driver's AWS settings for remote work on a non-local output (nothing for local outputs)."""
    if output_is_local:
        return {}
    return {name: os.environ[name] for name in FORWARDED_VARIABLES if os.environ.get(name)}
