"""Training samples for one rank: which samples it owns, decoded and tokenised, in batches.

Every rank must run the same number of steps (each step has collectives), so the split is planned
from sample counts that all ranks agree on, and `steps_per_epoch` is the minimum over ranks.
Data order depends only on (seed, epoch, rank, loader worker): a resumed run replays the same order,
and `StreamPosition` records how far each loader's stream was consumed so that a run resumed in the
middle of an epoch skips exactly those items, without decoding them.

With `resampled`, shards are drawn with replacement (each source by its weight) as an endless
stream; an "epoch" is then only a nominal length, and the stream of each epoch is seeded anew.
"""
from __future__ import annotations

import copy
import io
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T

from clipforge.train.item_chunks import Chunked, unchunked
from clipforge.train.shards import RawSample, ReadStats, SampleKeys, iter_raw_samples
from clipforge.train.split_plan import RankPlan, plan_split, steps_per_epoch

__all__ = ["RankPlan", "plan_split", "steps_per_epoch"]  # the split's names, kept where the loaders' users find them

log = logging.getLogger(__name__)

# Items per message from a loader process.
_CHUNK_ITEMS = 16


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
    """Marker for a sample (or, with `shard`, the rest of a shard) that was dropped.

    Kept in the stream so that the consumer can count it, and so that stream positions count it too.
    """

    reason: str
    shard: bool = False


@dataclass
class BrokenShard:
    """Marker in the raw stream: reading `url` stopped at a damaged tar."""

    url: str


def _raw_with_markers(url: str, keys: SampleKeys, stats: ReadStats, mark: bool) -> Iterator[RawSample | BrokenShard]:
    """The shard's complete samples, then a `BrokenShard` marker if the tar was damaged and `mark` is set."""
    before = len(stats.broken_shards)
    yield from iter_raw_samples(url, keys, stats)
    if mark and len(stats.broken_shards) > before:
        yield BrokenShard(url)


def _decoded(raw: RawSample | BrokenShard, preprocess: Callable, tokenizer: Callable, with_key: bool = False):
    """(image, tokens), or (image, tokens, sample key) `with_key`; a `Skipped` marker for what cannot be used."""
    if isinstance(raw, BrokenShard):
        return Skipped(f"{raw.url}: damaged tar, its remaining samples were skipped", shard=True)
    try:
        sample = decode_sample(raw, preprocess, tokenizer)
    except SampleError as e:
        return Skipped(str(e))
    return (*sample, raw.key) if with_key else sample


def _shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """A seeded shuffle buffer: items leave in random order once `buffer` are held (works on endless streams)."""
    if buffer <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= buffer:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _loader_slot(rotation: int) -> tuple[int, int]:
    """(logical loader id, loader count) of this DataLoader process; 0 of 1 in the main process.

    DataLoader hands out items round-robin from worker 0, passing over workers that ran out. A resumed
    epoch passes the rotation that makes its worker 0 play the logical loader whose turn was next, so
    the interleaving continues exactly as it would have (loaders that ran out yield nothing at once).
    """
    info = get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + rotation) % info.num_workers, info.num_workers


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
        skip: tuple[int, ...] = (),
        rotation: int = 0,
        tag: bool = False,
        with_keys: bool = False,
    ):
        """`skip[i]`: items of logical loader i already consumed (dropped undecoded); `rotation`: see
        `_loader_slot`; `tag`: yield (logical loader id, item) pairs, for `StreamPosition`; `with_keys`: samples
        are (image, tokens, sample key), for `BatchKeys`."""
        self.plan = plan
        self.keys = keys
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = epoch
        self.shuffle_buffer = shuffle_buffer
        self.skip = tuple(skip)
        self.rotation = rotation
        self.tag = tag
        self.with_keys = with_keys

    def _shard_order(self) -> list[str]:
        shards = list(self.plan.shards)
        if self.shuffle_buffer > 0:
            # Per-sample splits index samples over the shard order, so all ranks must share it.
            salt = (self.plan.rank,) if self.plan.mode == "shards" else ()
            epoch_rng(self.seed, self.epoch, *salt).shuffle(shards)
        return shards

    def _owned_raw(self, loader_id: int, loaders: int) -> Iterator[RawSample | BrokenShard]:
        shards = self._shard_order()
        split_shards = self.plan.mode == "shards" and len(shards) >= loaders
        if split_shards:
            shards = shards[loader_id::loaders]
        # A damaged shard is reported once: by its only reader, else by loader 0 (of rank 0 when all ranks read it).
        mark = split_shards or (loader_id == 0 and (self.plan.mode == "shards" or self.plan.rank == 0))
        stats = ReadStats()
        index = 0  # over complete samples of the shards read, in order
        owned = 0  # over this rank's samples
        for url in shards:
            for raw in _raw_with_markers(url, self.keys, stats, mark):
                if isinstance(raw, BrokenShard):
                    yield raw
                    continue
                mine = index % self.plan.stride == self.plan.offset
                index += 1
                if not mine:
                    continue
                if split_shards or owned % loaders == loader_id:
                    yield raw
                owned += 1
        if stats.incomplete:
            log.warning("rank %d: %d incomplete samples skipped", self.plan.rank, stats.incomplete)

    def __iter__(self):
        loader_id, loaders = _loader_slot(self.rotation)
        rng = epoch_rng(self.seed, self.epoch, self.plan.rank, loader_id)
        stream = _shuffled(self._owned_raw(loader_id, loaders), self.shuffle_buffer, rng)
        skip = self.skip[loader_id] if loader_id < len(self.skip) else 0
        for n, raw in enumerate(stream):
            if n < skip:
                continue  # consumed before the resume: the stream is replayed, but nothing is decoded
            item = _decoded(raw, self.preprocess, self.tokenizer, self.with_keys)
            yield (loader_id, item) if self.tag else item


@dataclass(frozen=True)
class WeightedShards:
    """One source of a resampled mixture: its shards, their sample counts, and the source's weight."""

    shards: tuple[str, ...]
    counts: tuple[int, ...]
    weight: float


def shard_probabilities(sources: list[WeightedShards]) -> tuple[list[str], list[float]]:
    """Every shard with the probability of drawing it, such that each source's share of the *samples*
    follows its weight and every sample of a source is equally likely.

    A draw yields the whole shard, so a shard of source s is drawn with probability proportional to
    weight_s / samples_s: its expected samples per draw are then proportional to weight_s * its share
    of the source's samples, which sum to weight_s over the source.
    """
    shards: list[str] = []
    raw: list[float] = []
    for src in sources:
        n = sum(src.counts)
        for url, count in zip(src.shards, src.counts):
            if count:
                shards.append(url)
                raw.append(src.weight / n)
    total = sum(raw)
    return shards, [r / total for r in raw]


class ResampledSamples(IterableDataset):
    """An endless stream of decoded samples of one rank: shards drawn with replacement, then shuffled.

    Every (rank, loader process) draws with its own generator seeded by (seed, epoch, rank, loader,
    `salt`); a resumed run passes the step it resumes at as `salt`, so it draws a fresh, reproducible
    stream instead of replaying the consumed one. `with_keys`: samples are (image, tokens, sample key).
    """

    def __init__(self, sources: list[WeightedShards], keys: SampleKeys, preprocess: Callable, tokenizer: Callable,
                 seed: int, epoch: int, rank: int, shuffle_buffer: int, salt: int = 0, tag: bool = False,
                 with_keys: bool = False):
        self.shards, self.probs = shard_probabilities(sources)
        if not self.shards:
            raise ValueError("resampled data: no source holds any complete sample")
        self.keys = keys
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.salt = salt
        self.tag = tag
        self.with_keys = with_keys

    def _raw(self, rng: random.Random, mark: bool) -> Iterator[RawSample | BrokenShard]:
        stats = ReadStats()
        while True:
            url = rng.choices(self.shards, weights=self.probs)[0]
            yield from _raw_with_markers(url, self.keys, stats, mark)

    def __iter__(self):
        loader_id, _ = _loader_slot(0)
        rng = epoch_rng(self.seed, self.epoch, self.rank, loader_id, self.salt)
        shuffle_rng = epoch_rng(self.seed, self.epoch, self.rank, loader_id, self.salt, 1)
        for raw in _shuffled(self._raw(rng, mark=True), self.shuffle_buffer, shuffle_rng):
            item = _decoded(raw, self.preprocess, self.tokenizer, self.with_keys)
            yield (loader_id, item) if self.tag else item


def _keep_as_is(item):
    return item


def sample_loader(dataset: IterableDataset, loader_workers: int, batch_size: int = 0) -> Iterable:
    """Single items from `loader_workers` processes (0: in this process); batching happens in `batches`.

    Loader processes send chunks of consecutive items, handed out one by one in the order that loading
    item by item gives (see clipforge.train.item_chunks), and hold up to two of the consumer's batches
    (`batch_size` items each) decoded ahead, together, as open_clip's loader does.
    """
    if loader_workers == 0:
        return DataLoader(dataset, batch_size=None, num_workers=0, collate_fn=_keep_as_is)
    chunk = min(_CHUNK_ITEMS, batch_size) if batch_size > 0 else _CHUNK_ITEMS
    loader = DataLoader(
        Chunked(dataset, chunk, tagged=getattr(dataset, "tag", False)),
        batch_size=None,
        num_workers=loader_workers,
        collate_fn=_keep_as_is,
        prefetch_factor=max(2, -(-2 * batch_size // (chunk * loader_workers))),
        persistent_workers=False,
    )
    return unchunked(loader, loader_workers)


@dataclass
class SkipCounter:
    """Undecodable samples and damaged shards met so far (the first few are logged)."""

    count: int = 0
    shards: int = 0
    _logged: int = 0

    def add(self, reason: str, limit: int = 5, shard: bool = False) -> None:
        if shard:
            self.shards += 1
        else:
            self.count += 1
        if self._logged < limit:
            self._logged += 1
            log.warning("skipped: %s", reason)


@dataclass
class StreamPosition:
    """Items (samples and markers) consumed from each logical loader's stream in the current epoch,
    and the loader whose item comes next."""

    consumed: list[int] = field(default_factory=list)
    next_loader: int = 0

    def start(self, loaders: int, consumed: list[int] | None = None, next_loader: int = 0) -> None:
        self.consumed = list(consumed) if consumed else [0] * loaders
        self.next_loader = next_loader if consumed else 0

    def take(self, loader_id: int) -> None:
        self.consumed[loader_id] += 1
        # DataLoader cycles through its processes, passing over those that ran out.
        self.next_loader = (loader_id + 1) % len(self.consumed)

    def state(self) -> dict:
        return {"consumed": list(self.consumed), "next_loader": self.next_loader}


@dataclass
class BatchKeys:
    """The sample keys (`__key__`) of the batch that `batches` yielded last, in the batch's order."""

    last: list[str] = field(default_factory=list)


def batches(
    items, batch_size: int, skipped: SkipCounter, keep_tail: bool = False, position: StreamPosition | None = None,
    keys: BatchKeys | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, tokens) batches from a stream of items; `Skipped` markers are counted.

    The last partial batch is dropped unless `keep_tail` (training steps need equal batches on all ranks).
    With `position`, items are (logical loader id, item) pairs and every item taken is counted there:
    when a batch is yielded, `position` holds exactly the items that went into it and the batches before.
    With `keys`, samples are (image, tokens, sample key) and `keys.last` holds the keys of the batch yielded.
    """
    images: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    names: list[str] = []
    for item in items:
        if position is not None:
            loader_id, item = item
            position.take(loader_id)
        if isinstance(item, Skipped):
            skipped.add(item.reason, shard=item.shard)
            continue
        images.append(item[0])
        tokens.append(item[1])
        if keys is not None:
            names.append(item[2])
        if len(images) == batch_size:
            if keys is not None:
                keys.last = names
            yield torch.stack(images), torch.stack(tokens)
            images, tokens, names = [], [], []
    if keep_tail and images:
        if keys is not None:
            keys.last = names
        yield torch.stack(images), torch.stack(tokens)


def train_transform(preprocess_train: Callable, crop_scale: tuple[float, float] | None,
                    horizontal_flip: bool) -> Callable:
    """The model's training transform with the spec's crop scale and optional horizontal flip.

    The model's own transform fixes size, interpolation and normalisation; only the random parts change.
    """
    transform: Any = copy.deepcopy(preprocess_train)  # a torchvision Compose, whose steps are replaced
    steps = list(getattr(transform, "transforms", []))
    crops = [i for i, t in enumerate(steps) if isinstance(t, T.RandomResizedCrop)]
    if not crops:
        if crop_scale is not None or horizontal_flip:
            raise ValueError(f"data.augment: the model's training transform has no random resized crop to adjust "
                             f"({transform})")
        return transform
    crop = steps[crops[0]]
    if crop_scale is not None:
        crop.scale = tuple(float(v) for v in crop_scale)
    if horizontal_flip:
        steps.insert(crops[0] + 1, T.RandomHorizontalFlip(0.5))
    transform.transforms = steps
    return transform
