"""Process environment defaults for clipforge's own entry points, applied where a process starts its work (the
command line, a Ray session, a Ray worker), never as a side effect of importing clipforge.

They make jobs work offline and on small local Ray clusters without setup; a value the user set always wins.
"""
from __future__ import annotations

import os

# For the processes that run jobs (the command line and every Ray worker of a job).
JOB_DEFAULTS = {
    # Pretrained towers are loaded from local files; never try a model hub at run time.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Tokenizers' own thread pool would be forked into DataLoader processes (a warning each time, then off).
    "TOKENIZERS_PARALLELISM": "false",
}

# For a local Ray that clipforge starts itself.
LOCAL_RAY_DEFAULTS = {
    # Local clusters started by clipforge need no token; users' clusters keep their own setting.
    "RAY_AUTH_MODE": "disabled",
    # Usage stats are not needed by jobs and cost start-up time on small machines.
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_defaults(defaults: dict[str, str]) -> None:
    """Set each variable the environment does not set yet."""
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def job_env_vars() -> dict[str, str]:
    """JOB_DEFAULTS as this process has them (the user's values included), for a Ray runtime_env."""
    return {name: os.environ.get(name, value) for name, value in JOB_DEFAULTS.items()}


def apply_entry_point_defaults() -> None:
    """What the command line (and a test or benchmark run, which start Ray themselves) set before any work."""
    apply_defaults({**JOB_DEFAULTS, **LOCAL_RAY_DEFAULTS})
