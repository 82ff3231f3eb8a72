"""Run one build, train or eval spec in this process; each kind's module is imported only when it runs, so a
`validate` or a `build` never pays for importing the training stack."""
from __future__ import annotations

from typing import Any


def run_single_job(spec: Any) -> Any:
    """Run a build, train or eval spec in this process (its Ray work on the spec's or a local Ray)."""
    kind = spec.kind
    if kind == "build":
        from clipforge.pipeline.build import run_build

        return run_build(spec)
    if kind == "train":
        from clipforge.train.trainer import run_train

        return run_train(spec)
    if kind == "eval":
        from clipforge.eval.evaluator import run_eval

        return run_eval(spec)
    raise ValueError(f"not a single job: kind {kind!r}")  # unreachable: specs are validated first
