"""Where a rank's training batches come from: cached frozen-tower features or the streamed shards.

Both kinds agree on the number of steps per epoch across ranks (every step has collectives) and
produce the inputs of the module they train: (image features, text features) for the projection
heads, (images, tokens) for the whole model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from clipforge.models import ModelBundle, ProjectionHeads
from clipforge.train.collectives import all_gather_object, all_min_int, broadcast_from_zero
from clipforge.train.data import (
    RankPlan,
    RankSamples,
    SkipCounter,
    batches,
    epoch_rng,
    plan_split,
    sample_loader,
    steps_per_epoch,
)
from clipforge.train.features import compute_feature_cache
from clipforge.train.shards import SampleKeys, count_samples, expand_shards
from clipforge.train.spec import TrainSpec

log = logging.getLogger(__name__)


class NotEnoughData(ValueError):
    """Some rank cannot fill a single local batch."""


@dataclass
class BatchSource:
    """The module to train and, per epoch, at most `steps` batches of its inputs for this rank."""

    module: torch.nn.Module
    steps: int
    epoch_batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def plan_ranks(spec: TrainSpec, keys: SampleKeys, rank: int, world_size: int) -> list[RankPlan]:
    """Shard list from rank 0, sample counts computed by all ranks in parallel, then the same plan everywhere."""
    shards = broadcast_from_zero(expand_shards(spec.data.shards) if rank == 0 else None)
    mine = {i: count_samples(shards[i], keys) for i in range(rank, len(shards), world_size)}
    counts: dict[int, int] = {}
    for part in all_gather_object(mine):
        counts.update(part)
    plans = plan_split(shards, [counts[i] for i in range(len(shards))], world_size)
    if rank == 0:
        log.info("training on %d shards, split by %s; samples per rank %s", len(shards), plans[0].mode,
                 [p.num_samples for p in plans])
    return plans


def _require_steps(steps: int, local_samples: int, spec: TrainSpec, rank: int) -> None:
    if steps < 1:
        local_batch = spec.data.batch_size // spec.scaling.workers
        raise NotEnoughData(
            f"data.shards: rank {rank} has {local_samples} usable samples but one step needs a local batch of "
            f"{local_batch} (data.batch_size {spec.data.batch_size} / scaling.workers {spec.scaling.workers}); "
            "lower data.batch_size or add data"
        )


def cached_features_source(spec: TrainSpec, bundle: ModelBundle, plans: list[RankPlan], keys: SampleKeys,
                           rank: int, device: torch.device, skipped: SkipCounter) -> BatchSource:
    """Run the frozen towers once over this rank's samples (eval transform), then train the heads on them."""
    t0 = time.perf_counter()
    local_batch = spec.data.batch_size // spec.scaling.workers
    samples = RankSamples(plans[rank], keys, bundle.preprocess_val, bundle.tokenizer, spec.seed, 0, 0)
    stream = batches(sample_loader(samples, spec.data.loader_workers), local_batch, skipped, keep_tail=True)
    cache = compute_feature_cache(bundle.model, stream, device)
    # Decoding failures make ranks' counts differ; all of them stop at the smallest.
    steps = all_min_int(len(cache) // local_batch)
    _require_steps(steps, len(cache), spec, rank)
    if rank == 0:
        log.info("cached frozen features of %d samples in %.1fs", len(cache), time.perf_counter() - t0)

    def epoch_batches(epoch: int):
        order = list(range(len(cache)))
        if spec.data.shuffle_buffer > 0:
            epoch_rng(spec.seed, epoch, rank).shuffle(order)
        rows = torch.tensor(order, dtype=torch.long)
        for s in range(steps):
            yield cache.batch(rows[s * local_batch : (s + 1) * local_batch], device)

    return BatchSource(ProjectionHeads(bundle.model), steps, epoch_batches)


def streamed_source(spec: TrainSpec, bundle: ModelBundle, plans: list[RankPlan], keys: SampleKeys,
                    rank: int, device: torch.device, skipped: SkipCounter) -> BatchSource:
    """Decode the shards every epoch and run the whole model (augmenting only when the towers train)."""
    local_batch = spec.data.batch_size // spec.scaling.workers
    steps = steps_per_epoch(plans, local_batch)
    _require_steps(steps, plans[rank].num_samples, spec, rank)
    preprocess = bundle.preprocess_train if spec.model.trainable != "heads" else bundle.preprocess_val

    def epoch_batches(epoch: int):
        samples = RankSamples(plans[rank], keys, preprocess, bundle.tokenizer, spec.seed, epoch,
                              spec.data.shuffle_buffer)
        for images, tokens in batches(sample_loader(samples, spec.data.loader_workers), local_batch, skipped):
            yield images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)

    return BatchSource(bundle.model, steps, epoch_batches)


def batch_source(spec: TrainSpec, bundle: ModelBundle, rank: int, world_size: int, device: torch.device,
                 skipped: SkipCounter) -> BatchSource:
    keys = SampleKeys.parse(spec.data.image_key, spec.data.text_key)
    plans = plan_ranks(spec, keys, rank, world_size)
    if spec.model.trainable == "heads" and spec.cache_frozen_features:
        return cached_features_source(spec, bundle, plans, keys, rank, device, skipped)
    return streamed_source(spec, bundle, plans, keys, rank, device, skipped)
