"""Run a validated job spec locally: a sweep through `sweep_run`, any other kind through `single_job` (which is
also how a sweep runs its children)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipforge.cluster.single_job import run_single_job
from clipforge.errors import SpecError

if TYPE_CHECKING:  # the train stack is imported only when a train spec runs
    from clipforge.train.rerun import RerunMode


def run_job(spec: Any, rerun: RerunMode = "check") -> Any:
    """Run any validated job spec, a sweep included; `rerun` is `run_single_job`'s (train specs only)."""
    if spec.kind == "sweep":
        from clipforge.cluster.sweep_run import run_sweep

        if rerun != "check":
            raise SpecError(f"--{rerun} applies to train specs only, and this spec is `kind: sweep`")
        return run_sweep(spec)
    return run_single_job(spec, rerun)
