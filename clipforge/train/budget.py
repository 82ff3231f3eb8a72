"""How long a run trains: `optim.epochs`, `optim.steps` or `optim.samples`, and what the schedule spans."""
from __future__ import annotations

import math

from clipforge.train.spec import OptimSpec


def total_steps(optim: OptimSpec, steps_per_epoch: int, global_batch: int) -> int:
    """Optimizer steps of the whole run (the learning-rate schedule's length).

    A sample budget is rounded up to whole global batches: the run sees at least that many samples.
    """
    if optim.steps is not None:
        return optim.steps
    if optim.samples is not None:
        return math.ceil(optim.samples / global_batch)
    assert optim.epochs is not None  # the spec fills in epochs: 1 when no length is given
    return optim.epochs * steps_per_epoch


def finished(optim: OptimSpec, epochs_done: int, steps_done: int, total: int) -> bool:
    """An epoch budget ends with its last epoch (which a damaged shard may shorten); the others at `total` steps."""
    if optim.epochs is not None:
        return epochs_done >= optim.epochs
    return steps_done >= total


def describe(optim: OptimSpec) -> str:
    if optim.steps is not None:
        return f"{optim.steps} steps"
    if optim.samples is not None:
        return f"{optim.samples} samples"
    return f"{optim.epochs} epochs"
