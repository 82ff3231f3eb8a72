"""Items from DataLoader processes sent in chunks, handed out one by one in the order single items would have had.

A tensor sent from a loader process travels as a shared-memory handle that the receiving process must
request from the sender; while the sender is busy decoding, each request waits for its turn at the
sender's interpreter lock (about 5 ms). Sent one sample (two tensors) at a time, a step of 32 samples
waited about 0.25 s for handles alone on 2 CPU cores. A chunk stacks the tensors of consecutive samples
of one loader process, so a batch costs a few requests instead of two per sample.

The consumer sees exactly the stream that per-item loading gave: DataLoader hands out the items of its
processes round-robin from process 0, passing over processes that ran out, and `unchunked` rebuilds that
order item by item from the chunks, whatever their size. Resuming from a stream position (see
`StreamPosition` in clipforge.train.data) therefore works unchanged.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info


@dataclass
class Chunk:
    """Consecutive items of loader process `worker`; `end` marks that process's last message."""

    worker: int
    entries: list  # per item: (tag or None, whether it is a sample, the item itself when it is not)
    columns: list  # per sample field: the samples' values stacked into one tensor, or a list if they differ
    end: bool = False

    def items(self) -> Iterator[Any]:
        row = 0
        for tag, is_sample, value in self.entries:
            if is_sample:
                value = tuple(col[row] for col in self.columns)
                row += 1
            yield value if tag is None else (tag, value)


def _column(values: list) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and all(
        isinstance(v, torch.Tensor) and v.shape == first.shape and v.dtype == first.dtype for v in values
    ):
        return torch.stack(values)
    return list(values)


def _chunk(worker: int, items: list, tagged: bool) -> Chunk:
    entries, samples = [], []
    for item in items:
        tag, value = item if tagged else (None, item)
        if isinstance(value, tuple) and value:
            samples.append(value)
            entries.append((tag, True, None))
        else:
            entries.append((tag, False, value))
    columns = [_column([s[i] for s in samples]) for i in range(len(samples[0]))] if samples else []
    return Chunk(worker, entries, columns)


class Chunked(IterableDataset):
    """`dataset`'s items in chunks of up to `size`, then an end marker (inside each loader process).

    Items are samples (non-empty tuples, whose equal-shaped tensor fields are stacked) or anything else
    (markers, passed as they are); with `tagged`, each item is a (tag, item) pair and keeps its tag.
    """

    def __init__(self, dataset: IterableDataset, size: int, tagged: bool):
        self.dataset, self.size, self.tagged = dataset, max(1, size), tagged

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        held: list = []
        for item in self.dataset:
            held.append(item)
            if len(held) == self.size:
                yield _chunk(worker, held, self.tagged)
                held = []
        if held:
            yield _chunk(worker, held, self.tagged)
        yield Chunk(worker, [], [], end=True)


def unchunked(chunks: Iterable[Chunk], workers: int) -> Iterator[Any]:
    """The items of `chunks` (from `workers` loader processes) in per-item round-robin order."""
    stream = iter(chunks)
    held: list[deque[Any]] = [deque() for _ in range(max(1, workers))]
    ended = [False] * len(held)
    turn = 0
    while not all(ended) or any(held):
        while not held[turn] and not ended[turn]:
            chunk = next(stream, None)
            if chunk is None:  # every process is done (their end markers are already in)
                ended = [True] * len(held)
                break
            if chunk.end:
                ended[chunk.worker] = True
            else:
                held[chunk.worker].extend(chunk.items())
        if held[turn]:
            yield held[turn].popleft()
        turn = (turn + 1) % len(held)
