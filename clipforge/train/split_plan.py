"""Which samples each rank owns: the trainer's split of the shards' samples over the ranks.

Every rank must run the same number of steps (each step has collectives), so the split is planned from
sample counts that all ranks agree on, and `steps_per_epoch` is the minimum over ranks. Its own module,
without torch, so that `clipforge run --dry-run` plans a run with the trainer's very rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The shard split is used when it keeps at least this share of what a per-sample split would use;
# per-sample splits make every rank read every shard, which costs I/O on remote storage.
_SHARD_SPLIT_MIN_EFFICIENCY = 0.9


@dataclass(frozen=True)
class RankPlan:
    """The samples one rank owns: complete samples of `shards`, every `stride`-th from `offset`."""

    rank: int
    world_size: int
    mode: Literal["shards", "samples"]
    shards: tuple[str, ...]
    stride: int
    offset: int
    num_samples: int


def plan_split(shards: list[str], counts: list[int], world_size: int) -> list[RankPlan]:
    """Deterministic split of the shards' samples over `world_size` ranks.

    With at least as many shards as ranks, whole shards go to ranks (largest first to the least
    loaded rank) unless that leaves ranks so unequal that more than 10% of the data would be dropped
    by the common step count; then every rank reads all shards and keeps every world_size-th sample.
    """
    if len(shards) != len(counts):
        raise ValueError("plan_split: one count per shard is needed")
    total = sum(counts)
    per_sample_usable = (total // world_size) * world_size
    if len(shards) >= world_size:
        loads = [0] * world_size
        owned: list[list[int]] = [[] for _ in range(world_size)]
        for i in sorted(range(len(shards)), key=lambda i: (-counts[i], i)):
            r = min(range(world_size), key=lambda r: (loads[r], r))
            loads[r] += counts[i]
            owned[r].append(i)
        if min(loads) * world_size >= _SHARD_SPLIT_MIN_EFFICIENCY * per_sample_usable:
            return [
                RankPlan(r, world_size, "shards", tuple(shards[i] for i in sorted(owned[r])), 1, 0, loads[r])
                for r in range(world_size)
            ]
    return [
        RankPlan(r, world_size, "samples", tuple(shards), world_size, r, len(range(r, total, world_size)))
        for r in range(world_size)
    ]


def steps_per_epoch(plans: list[RankPlan], local_batch: int) -> int:
    """Steps every rank can run with full local batches (drop_last)."""
    return min(p.num_samples for p in plans) // local_batch
