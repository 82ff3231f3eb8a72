"""How many steps and samples a train spec will run, from its shards' sample counts, without torch or Ray.

The numbers are the trainer's: every rank runs the same number of full local batches per epoch, so an
epoch is the smallest rank's share of the samples divided by the local batch, and that share follows the
trainer's own split (`clipforge.train.split_plan`, which needs no torch). With `data.resampled`, an epoch is
the nominal pass of `clipforge.train.sources.resampled_source`.
"""
from __future__ import annotations

from dataclasses import dataclass

from clipforge.train.budget import total_steps
from clipforge.train.split_plan import plan_split, steps_per_epoch


@dataclass(frozen=True)
class TrainPlan:
    """The planned length of a training run."""

    samples_per_epoch: int  # complete samples of all shards (a nominal epoch when resampled)
    steps_per_epoch: int
    total_steps: int
    global_batch: int

    @property
    def total_samples(self) -> int:
        return self.total_steps * self.global_batch


def plan_train(spec, source_counts: list[list[int]]) -> TrainPlan:
    """The plan of a train spec whose sources' shards hold `source_counts` samples (one list per source)."""
    workers = spec.scaling.workers
    local_batch = spec.data.batch_size // workers
    counts = [c for source in source_counts for c in source]
    if spec.data.resampled:
        steps = sum(counts) // workers // local_batch
    else:
        steps = steps_per_epoch(plan_split([str(i) for i in range(len(counts))], counts, workers), local_batch)
    return TrainPlan(samples_per_epoch=sum(counts), steps_per_epoch=steps,
                     total_steps=total_steps(spec.optim, steps, spec.data.batch_size),
                     global_batch=spec.data.batch_size)
