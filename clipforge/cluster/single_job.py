"""Run one build, train or eval spec in this process; each kind's module is imported only when it runs, so a
`validate` or a `build` never pays for importing the training stack."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipforge.errors import SpecError

if TYPE_CHECKING:  # the train stack is imported only when a train spec runs
    from clipforge.train.rerun import RerunMode


def run_single_job(spec: Any, rerun: RerunMode = "check") -> Any:
    """Run a build, train or eval spec in this process (its Ray work on the spec's or a local Ray).

    `rerun` (train specs only): what a re-run does with checkpoints trained under a spec this one changes:
    refuse (`check`), continue them (`resume`) or train into a new folder (`fresh`); see clipforge.train.rerun.
    """
    kind = spec.kind
    if rerun != "check" and kind != "train":
        raise SpecError(f"--{rerun} applies to train specs only, and this spec is `kind: {kind}`")
    if kind == "build":
        from clipforge.pipeline.build import run_build

        return run_build(spec)
    if kind == "train":
        from clipforge.train.trainer import run_train

        return run_train(spec, rerun=rerun)
    if kind == "eval":
        from clipforge.eval.evaluator import run_eval

        return run_eval(spec)
    raise ValueError(f"not a single job: kind {kind!r}")  # unreachable: specs are validated first
