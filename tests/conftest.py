"""Shared fixtures: one local Ray per test session, a private Ray head for job submission, real demo data
cached under data/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipforge.runtime.environment import apply_defaults, apply_entry_point_defaults

# As the command line does: offline model hubs, local Ray settings; img2dataset (a reference tool in
# tests) imports albumentations, which would otherwise look for updates online.
apply_entry_point_defaults()
apply_defaults({"NO_ALBUMENTATIONS_UPDATE": "1"})

REPO = Path(__file__).resolve().parents[1]
DATA_CACHE = Path(os.environ.get("CLIPFORGE_DATA_CACHE", REPO / "data" / "cache"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs shared by every test that needs one (started once: start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def data_cache() -> Path:
    DATA_CACHE.mkdir(parents=True, exist_ok=True)
    return DATA_CACHE


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 API (moto_server) on a free loopback port for the whole session."""
    from s3_server import start_moto, stop

    proc, endpoint = start_moto()
    yield endpoint
    stop(proc)


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head (dashboard + job server) on 127.0.0.1 for the tests of one module that submit jobs
    (stopped after the module, so it holds no memory while the rest of the suite runs); yields its dashboard URL
    (see ray_cluster.py)."""
    from ray_cluster import running_head

    yield from running_head()
