"""Joining or starting Ray for a job, with guaranteed teardown of what we started.

A job joins the Ray already initialised in its process, else the cluster at `ray.address` /
RAY_ADDRESS, else starts a private local Ray. A private Ray is watched by a `LocalRayReaper`: all of
its processes end with this process, however it ends (see `local_ray_reaper.py`). Every worker of the
job gets the job environment defaults (`environment.JOB_DEFAULTS`) through its runtime_env.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from clipforge.runtime.environment import JOB_DEFAULTS, LOCAL_RAY_DEFAULTS, apply_defaults, job_env_vars
from clipforge.runtime.local_ray_reaper import LocalRayReaper
from clipforge.specbase import RayInit

log = logging.getLogger(__name__)

# Ray Train's placement-group cleaner asks the State API once a second whether the controller lives;
# a local cluster started without a dashboard has no State API, so every ask logs a warning.
_NOISY_WITHOUT_DASHBOARD = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# The reaper finds a Ray's processes in /proc.
_CAN_REAP = sys.platform.startswith("linux")


def quiet_without_dashboard() -> None:
    """Worker-process setup hook of local clusters: silence warnings that only say the dashboard is off."""
    logging.getLogger(_NOISY_WITHOUT_DASHBOARD).setLevel(logging.ERROR)


def starts_private_ray(cfg: RayInit | None = None) -> bool:
    """Whether `ray_session(cfg)` will start a local Ray of its own."""
    import ray

    return not ray.is_initialized() and not ((cfg and cfg.address) or os.environ.get("RAY_ADDRESS"))


def _runtime_env(cfg: RayInit, private: bool) -> dict:
    env = dict(cfg.runtime_env or {})
    env["env_vars"] = {**job_env_vars(), **(env.get("env_vars") or {})}
    if private:
        env.setdefault("worker_process_setup_hook", f"{__name__}.quiet_without_dashboard")
    return env


@contextlib.contextmanager
def _reaper(private: bool) -> Iterator[LocalRayReaper | None]:
    if not (private and _CAN_REAP):
        yield None
        return
    try:
        reaper = LocalRayReaper()
    except OSError as e:  # the job still runs; only a killed driver may then leave Ray processes for a while
        log.warning("cannot start the watchdog that ends the local Ray with this process: %s", e)
        yield None
        return
    with reaper:
        yield reaper


@contextlib.contextmanager
def ray_session(cfg: RayInit | None = None) -> Iterator[None]:
    """Use the Ray already initialised in this process, else connect/start one; shut down only what we started."""
    import ray

    if ray.is_initialized():
        yield
        return
    cfg = cfg or RayInit()
    apply_defaults(JOB_DEFAULTS)  # this process is a job's driver: the same settings as its workers
    private = starts_private_ray(cfg)
    kwargs: dict = {"runtime_env": _runtime_env(cfg, private), "log_to_driver": True}
    if private:
        apply_defaults(LOCAL_RAY_DEFAULTS)
        # A private local cluster: no dashboard (saves ~1 s and a port), all local CPUs.
        kwargs.update(include_dashboard=False, num_cpus=os.cpu_count() or 1)
    else:
        kwargs["address"] = cfg.address or os.environ["RAY_ADDRESS"]
    with _reaper(private) as reaper:
        # Processes started while marking (the raylet, and through it every agent and worker) are this Ray's.
        with reaper.marking() if reaper else contextlib.nullcontext():
            ray.init(**kwargs)
        try:
            yield
        finally:
            ray.shutdown()  # first; then the reaper ends whatever of this Ray is left
