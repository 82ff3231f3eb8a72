"""Where a rank's training batches come from: cached frozen-tower features or the streamed shards.

All kinds agree on the number of steps per epoch across ranks (every step has collectives) and
produce the inputs of the module they train: (image features, text features) for the projection
heads, (images, tokens) for the whole model. Each can start an epoch part-way, from the position
saved in a checkpoint (see `BatchSource.epoch_batches`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from clipforge.errors import UserError
from clipforge.models import ModelBundle, ProjectionHeads
from clipforge.train.collectives import all_gather_object, all_min_int, broadcast_from_zero
from clipforge.train.data import (
    BatchKeys,
    RankPlan,
    RankSamples,
    ResampledSamples,
    SkipCounter,
    StreamPosition,
    WeightedShards,
    batches,
    epoch_rng,
    plan_split,
    sample_loader,
    steps_per_epoch,
    train_transform,
)
from clipforge.train.frozen_features import compute_feature_cache
from clipforge.train.shards import SampleKeys, count_samples, expand_sources, source_field
from clipforge.train.spec import TrainSpec

log = logging.getLogger(__name__)

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class NotEnoughData(UserError, ValueError):
    """Some rank cannot fill a single local batch."""


def _no_keys() -> list[str]:
    return []


@dataclass
class BatchSource:
    """The module to train and, per epoch, at most `steps` batches of its inputs for this rank.

    `epoch_batches(epoch, start_step, saved)` yields the batches of `epoch` from step `start_step` on;
    `saved` is this rank's `position()` from the checkpoint, or None when there is none that fits
    (then a part-way epoch starts from the epoch's first batch). `layout` says which saved positions
    fit: only those written by a source of the same layout. `batch_keys()` gives the sample keys of the
    batch that `epoch_batches` yielded last, when the source was built to track them (else []).
    """

    module: torch.nn.Module
    steps: int
    epoch_batches: Callable[[int, int, dict | None], Batches]
    position: Callable[[], dict]
    layout: str
    batch_keys: Callable[[], list[str]] = _no_keys


def _no_position() -> dict:
    return {}


def _keys_of(current: BatchKeys | None) -> Callable[[], list[str]]:
    """`BatchSource.batch_keys` of a source whose `batches` record their keys in `current` (None: not tracked)."""
    if current is None:
        return _no_keys
    return lambda: current.last


def _feature_batches(stream: Batches, current: BatchKeys | None, row_keys: list[str]) -> Batches:
    """`stream` as it is, appending each batch's sample keys to `row_keys` (the feature cache's rows, in order)."""
    for batch in stream:
        if current is not None:
            row_keys.extend(current.last)
        yield batch


def count_sources(spec: TrainSpec, keys: SampleKeys, rank: int, world_size: int) -> list[WeightedShards]:
    """Shard lists from rank 0, sample counts computed by all ranks in parallel, the same result everywhere."""
    lists = broadcast_from_zero(expand_sources(spec.data) if rank == 0 else None)
    unique = sorted({url for urls in lists for url in urls})
    mine = {url: count_samples(url, keys) for url in unique[rank::world_size]}
    counts: dict[str, int] = {}
    for part in all_gather_object(mine):
        counts.update(part)
    weights = [s.weight for s in spec.data.source_list()]
    sources = [WeightedShards(tuple(urls), tuple(counts[u] for u in urls), w) for urls, w in zip(lists, weights)]
    for i, src in enumerate(sources):
        if sum(src.counts) == 0:
            where = source_field(i if spec.data.sources is not None else None)
            raise NotEnoughData(f"{where}: its {len(src.shards)} shards hold no complete sample "
                                f"(image `{spec.data.image_key}` and caption `{spec.data.text_key}`)")
    return sources


def plan_ranks(sources: list[WeightedShards], rank: int, world_size: int) -> list[RankPlan]:
    """One epoch-wise split of all sources' shards over the ranks (every shard read once per epoch)."""
    shards = [url for src in sources for url in src.shards]
    counts = [c for src in sources for c in src.counts]
    plans = plan_split(shards, counts, world_size)
    if rank == 0:
        log.info("training on %d shards, split by %s; samples per rank %s", len(shards), plans[0].mode,
                 [p.num_samples for p in plans])
    return plans


def _require_steps(steps: int, local_samples: int, spec: TrainSpec, rank: int) -> None:
    if steps < 1:
        local_batch = spec.data.batch_size // spec.scaling.workers
        field = "data.sources" if spec.data.sources is not None else "data.shards"
        raise NotEnoughData(
            f"{field}: rank {rank} has {local_samples} usable samples but one step needs a local batch of "
            f"{local_batch} (data.batch_size {spec.data.batch_size} / scaling.workers {spec.scaling.workers}); "
            "lower data.batch_size or add data"
        )


def cached_features_source(spec: TrainSpec, bundle: ModelBundle, plans: list[RankPlan], keys: SampleKeys,
                           rank: int, device: torch.device, skipped: SkipCounter,
                           track_keys: bool = False) -> BatchSource:
    """Run the frozen towers once over this rank's samples (eval transform), then train the heads on them."""
    t0 = time.perf_counter()
    local_batch = spec.data.batch_size // spec.scaling.workers
    samples = RankSamples(plans[rank], keys, bundle.preprocess_val, bundle.tokenizer, spec.seed, 0, 0,
                          with_keys=track_keys)
    current = BatchKeys() if track_keys else None
    stream = batches(sample_loader(samples, spec.data.loader_workers, local_batch), local_batch, skipped,
                     keep_tail=True, keys=current)
    row_keys: list[str] = []  # the sample key of each cache row, with track_keys
    cache = compute_feature_cache(bundle.model, _feature_batches(stream, current, row_keys), device)
    # Decoding failures make ranks' counts differ; all of them stop at the smallest.
    steps = all_min_int(len(cache) // local_batch)
    _require_steps(steps, len(cache), spec, rank)
    if rank == 0:
        log.info("cached frozen features of %d samples in %.1fs", len(cache), time.perf_counter() - t0)

    def epoch_batches(epoch: int, start_step: int, saved: dict | None) -> Batches:
        order = list(range(len(cache)))
        if spec.data.shuffle_buffer > 0:
            epoch_rng(spec.seed, epoch, rank).shuffle(order)
        rows = torch.tensor(order, dtype=torch.long)
        for s in range(start_step, steps):
            if current is not None:
                current.last = [row_keys[i] for i in order[s * local_batch : (s + 1) * local_batch]]
            yield cache.batch(rows[s * local_batch : (s + 1) * local_batch], device)

    # The cache order is fixed by (seed, epoch, rank): the step alone says where an epoch stood.
    return BatchSource(ProjectionHeads(bundle.model), steps, epoch_batches, _no_position, "cached",
                       _keys_of(current))


def _image_transform(spec: TrainSpec, bundle: ModelBundle):
    if spec.model.trainable == "heads":
        return bundle.preprocess_val  # frozen towers: augmenting would only add noise to fixed features
    aug = spec.data.augment
    return train_transform(bundle.preprocess_train, aug.crop_scale, aug.horizontal_flip)


def streamed_source(spec: TrainSpec, bundle: ModelBundle, plans: list[RankPlan], keys: SampleKeys,
                    rank: int, device: torch.device, skipped: SkipCounter, track_keys: bool = False) -> BatchSource:
    """Decode the shards every epoch and run the whole model (augmenting only when the towers train)."""
    local_batch = spec.data.batch_size // spec.scaling.workers
    steps = steps_per_epoch(plans, local_batch)
    _require_steps(steps, plans[rank].num_samples, spec, rank)
    preprocess = _image_transform(spec, bundle)
    loaders = max(1, spec.data.loader_workers)
    position = StreamPosition()
    current = BatchKeys() if track_keys else None

    def epoch_batches(epoch: int, start_step: int, saved: dict | None) -> Batches:
        consumed = saved.get("consumed") if saved else None
        if consumed is not None and len(consumed) != loaders:
            consumed = None
        if start_step and consumed is None and rank == 0:
            log.warning("epoch %d resumes at step %d without a usable data position (the worker or loader count "
                        "changed): it restarts from the epoch's first sample", epoch + 1, start_step)
        position.start(loaders, consumed, int(saved.get("next_loader", 0)) if saved and consumed else 0)
        samples = RankSamples(plans[rank], keys, preprocess, bundle.tokenizer, spec.seed, epoch,
                              spec.data.shuffle_buffer, skip=tuple(position.consumed),
                              rotation=position.next_loader, tag=True, with_keys=track_keys)
        loader = sample_loader(samples, spec.data.loader_workers, local_batch)
        for images, tokens in batches(loader, local_batch, skipped, position=position, keys=current):
            yield images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)

    return BatchSource(bundle.model, steps, epoch_batches, position.state, f"streamed/{loaders}", _keys_of(current))


def resampled_source(spec: TrainSpec, bundle: ModelBundle, sources: list[WeightedShards], keys: SampleKeys,
                     rank: int, device: torch.device, skipped: SkipCounter, track_keys: bool = False) -> BatchSource:
    """Shards drawn with replacement by source weight; an epoch is all sources' samples once, nominally."""
    local_batch = spec.data.batch_size // spec.scaling.workers
    total = sum(sum(src.counts) for src in sources)
    steps = total // spec.scaling.workers // local_batch
    _require_steps(steps, total // spec.scaling.workers, spec, rank)
    preprocess = _image_transform(spec, bundle)
    current = BatchKeys() if track_keys else None
    if rank == 0:
        shares = [round(src.weight / sum(s.weight for s in sources), 4) for src in sources]
        log.info("resampling %d shards of %d sources (sample shares %s); nominal epoch: %d steps",
                 sum(len(s.shards) for s in sources), len(sources), shares, steps)

    def epoch_batches(epoch: int, start_step: int, saved: dict | None) -> Batches:
        # A part-way epoch draws a new stream seeded by its start step: nothing is replayed or re-read.
        samples = ResampledSamples(sources, keys, preprocess, bundle.tokenizer, spec.seed, epoch, rank,
                                   spec.data.shuffle_buffer, salt=start_step, with_keys=track_keys)
        loader = sample_loader(samples, spec.data.loader_workers, local_batch)
        for images, tokens in batches(loader, local_batch, skipped, keys=current):
            yield images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)

    return BatchSource(bundle.model, steps, epoch_batches, _no_position, "resampled", _keys_of(current))


def batch_source(spec: TrainSpec, bundle: ModelBundle, rank: int, world_size: int, device: torch.device,
                 skipped: SkipCounter) -> BatchSource:
    keys = SampleKeys.parse(spec.data.image_key, spec.data.text_key)
    sources = count_sources(spec, keys, rank, world_size)
    cached = spec.model.trainable == "heads" and spec.cache_frozen_features
    track_keys = spec.debug.log_sample_keys
    if spec.data.resampled:
        if cached and rank == 0:
            log.info("resampled data is streamed: cache_frozen_features applies to epoch-wise data only")
        return resampled_source(spec, bundle, sources, keys, rank, device, skipped, track_keys)
    plans = plan_ranks(sources, rank, world_size)
    if cached:
        return cached_features_source(spec, bundle, plans, keys, rank, device, skipped, track_keys)
    return streamed_source(spec, bundle, plans, keys, rank, device, skipped, track_keys)
