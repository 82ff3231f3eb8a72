"""Run a validated job spec locally: a sweep through `sweep_run`, any other kind through `single_job` (which is
also how a sweep runs its children)."""
from __future__ import annotations

from typing import Any

from clipforge.cluster.single_job import run_single_job


def run_job(spec: Any) -> Any:
    """Run any validated job spec, a sweep included."""
    if spec.kind == "sweep":
        from clipforge.cluster.sweep_run import run_sweep

        return run_sweep(spec)
    return run_single_job(spec)
