"""Training samples for one rank: which samples it owns, decoded and tokenised, in batches.

Every rank must run the same number of steps (each step has collectives), so the split is planned
from sample counts that all ranks agree on, and `steps_per_epoch` is the minimum over ranks.
Data order depends only on (seed, epoch, rank, loader worker): a resumed run replays the same order.
"""
from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.train.shards import RawSample, ReadStats, SampleKeys, iter_raw_samples

log = logging.getLogger(__name__)

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


def epoch_rng(seed: int, epoch: int, *salt: int) -> random.Random:
    """A generator that depends only on its arguments (never on Python's per-process hash seed)."""
    return random.Random(repr((int(seed), int(epoch)) + tuple(int(s) for s in salt)))


class SampleError(ValueError):
    """A sample that cannot be decoded; it is skipped and counted."""


def decode_sample(raw: RawSample, preprocess: Callable, tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Image bytes -> preprocessed tensor, caption bytes -> token ids. Raises SampleError naming the sample."""
    try:
        with Image.open(io.BytesIO(raw.image)) as im:
            image = im.convert("RGB")
        caption = raw.text.decode("utf-8").strip()
    except Exception as e:  # noqa: BLE001 - any decoder failure means the sample is unusable
        raise SampleError(f"{raw.url}: sample {raw.key}: cannot decode ({type(e).__name__}: {e})") from None
    if not caption:
        raise SampleError(f"{raw.url}: sample {raw.key}: empty caption")
    return preprocess(image), tokenizer([caption])[0]


@dataclass
class Skipped:
    """Marker for a sample that was dropped (kept in the stream so the consumer can count it)."""

    reason: str


class RankSamples(IterableDataset):
    """Decoded (image, tokens) pairs of one rank for one epoch, with `Skipped` markers for bad samples.

    Order: shards (shuffled per epoch when shuffling), then a seeded shuffle buffer. With several
    loader processes each one takes its share (whole shards when the rank has enough, else every
    n-th sample), so the union over loader processes is exactly the rank's samples.
    """

    def __init__(
        self,
        plan: RankPlan,
        keys: SampleKeys,
        preprocess: Callable,
        tokenizer: Callable,
        seed: int,
        epoch: int,
        shuffle_buffer: int,
    ):
        self.plan = plan
        self.keys = keys
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = epoch
        self.shuffle_buffer = shuffle_buffer

    def _shard_order(self) -> list[str]:
        shards = list(self.plan.shards)
        if self.shuffle_buffer > 0:
            # Per-sample splits index samples over the shard order, so all ranks must share it.
            salt = (self.plan.rank,) if self.plan.mode == "shards" else ()
            epoch_rng(self.seed, self.epoch, *salt).shuffle(shards)
        return shards

    def _owned_raw(self, loader_id: int, loaders: int) -> Iterator[RawSample]:
        shards = self._shard_order()
        split_shards = self.plan.mode == "shards" and len(shards) >= loaders
        if split_shards:
            shards = shards[loader_id::loaders]
        stats = ReadStats()
        index = 0  # over complete samples of the shards read, in order
        owned = 0  # over this rank's samples
        for url in shards:
            for raw in iter_raw_samples(url, self.keys, stats):
                mine = index % self.plan.stride == self.plan.offset
                index += 1
                if not mine:
                    continue
                if split_shards or owned % loaders == loader_id:
                    yield raw
                owned += 1
        if stats.incomplete:
            log.warning("rank %d: %d incomplete samples skipped", self.plan.rank, stats.incomplete)

    def _shuffled(self, raws: Iterator[RawSample], loader_id: int) -> Iterator[RawSample]:
        if self.shuffle_buffer <= 1:
            yield from raws
            return
        rng = epoch_rng(self.seed, self.epoch, self.plan.rank, loader_id)
        buf: list[RawSample] = []
        for raw in raws:
            buf.append(raw)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        info = get_worker_info()
        loader_id, loaders = (info.id, info.num_workers) if info is not None else (0, 1)
        for raw in self._shuffled(self._owned_raw(loader_id, loaders), loader_id):
            try:
                yield decode_sample(raw, self.preprocess, self.tokenizer)
            except SampleError as e:
                yield Skipped(str(e))


def _keep_as_is(item):
    return item


def sample_loader(dataset: RankSamples, loader_workers: int) -> DataLoader:
    """Single items from `loader_workers` processes (0: in this process); batching happens in `batches`."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=loader_workers,
        collate_fn=_keep_as_is,
        prefetch_factor=8 if loader_workers > 0 else None,
        persistent_workers=False,
    )


@dataclass
class SkipCounter:
    count: int = 0
    _logged: int = 0

    def add(self, reason: str, limit: int = 5) -> None:
        self.count += 1
        if self._logged < limit:
            self._logged += 1
            log.warning("skipped: %s", reason)


def batches(
    items, batch_size: int, skipped: SkipCounter, keep_tail: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, tokens) batches from a stream of items; `Skipped` markers are counted.

    The last partial batch is dropped unless `keep_tail` (training steps need equal batches on all ranks).
    """
    images: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, Skipped):
            skipped.add(item.reason)
            continue
        images.append(item[0])
        tokens.append(item[1])
        if len(images) == batch_size:
            yield torch.stack(images), torch.stack(tokens)
            images, tokens = [], []
    if keep_tail and images:
        yield torch.stack(images), torch.stack(tokens)
