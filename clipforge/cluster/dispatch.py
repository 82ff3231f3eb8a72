"""Run a validated job spec locally: one function per `kind`, imported lazily so that a
`validate` or a `build` never pays for importing the training stack."""
from __future__ import annotations

from typing import Any


def run_job(spec: Any) -> Any:
    kind = spec.kind
    if kind == "build":
        from clipforge.pipeline.build import run_build

        return run_build(spec)
    if kind == "train":
        from clipforge.train.runner import run_train

        return run_train(spec)
    if kind == "eval":
        from clipforge.eval.runner import run_eval

        return run_eval(spec)
    if kind == "sweep":
        from clipforge.cluster.sweep_run import run_sweep

        return run_sweep(spec)
    raise ValueError(f"unknown kind {kind!r}")  # unreachable: specs are validated first
