"""Joining or starting Ray for a job, with guaranteed teardown of what we started."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from clipforge.specbase import RayInit

log = logging.getLogger(__name__)

# Ray Train's placement-group cleaner asks the State API once a second whether the controller lives;
# a local cluster started without a dashboard has no State API, so every ask logs a warning.
_NOISY_WITHOUT_DASHBOARD = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_without_dashboard() -> None:
    """Worker-process setup hook of local clusters: silence warnings that only say the dashboard is off."""
    logging.getLogger(_NOISY_WITHOUT_DASHBOARD).setLevel(logging.ERROR)


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
        env = dict(kwargs["runtime_env"] or {})
        env.setdefault("worker_process_setup_hook", f"{__name__}.quiet_without_dashboard")
        kwargs["runtime_env"] = env
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()
