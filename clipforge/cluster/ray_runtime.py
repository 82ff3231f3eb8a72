"""Joining or starting Ray for a job, with guaranteed teardown of what we started."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from clipforge.specbase import RayInit

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(cfg: RayInit | None = None) -> Iterator[None]:
    """Use the Ray already initialised in this process, else connect/start one; shut down only what we started."""
    import ray

    if ray.is_initialized():
        yield
        return
    cfg = cfg or RayInit()
    kwargs: dict = {"runtime_env": cfg.runtime_env or None, "log_to_driver": True}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        # A private local cluster: no dashboard (saves ~1 s and a port), all local CPUs.
        kwargs.update(include_dashboard=False, num_cpus=os.cpu_count() or 1)
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()
