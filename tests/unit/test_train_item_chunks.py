"""Loader processes send chunks of items; the consumer must still get exactly the per-item stream."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.train.data import Skipped, _keep_as_is, sample_loader


class Uneven(IterableDataset):
    """Loader process w yields lengths[w] tagged items: samples (a tensor and a caption) and skip markers."""

    tag = True

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        for i in range(self.lengths[w]):
            item = Skipped(f"bad {w}-{i}") if i % 7 == 3 else (torch.full((3,), w * 1000 + i), f"caption {w}-{i}")
            yield w, item


def _plain(item):
    tag, value = item
    if isinstance(value, Skipped):
        return tag, value.reason
    return tag, tuple(value[0].tolist()), value[1]


@pytest.mark.parametrize("lengths", [[5, 9, 0], [10, 3, 7], [33, 33, 1]])
def test_chunked_loading_hands_out_the_per_item_order(lengths):
    """Processes that run out early (one at once) are passed over exactly as DataLoader does for single items,
    whatever the chunk size (set by the consumer's batch size)."""
    per_item = DataLoader(Uneven(lengths), batch_size=None, num_workers=3, collate_fn=_keep_as_is)
    expected = [_plain(i) for i in per_item]
    assert len(expected) == sum(lengths)
    for batch_size in (1, 4, 32):
        assert [_plain(i) for i in sample_loader(Uneven(lengths), 3, batch_size)] == expected, batch_size


def test_each_sample_gets_its_own_row_of_the_stacked_chunk():
    items = list(sample_loader(Uneven([20]), 1, 8))
    samples = [v for _, v in items if not isinstance(v, Skipped)]
    assert [int(s[0][0]) for s in samples] == [i for i in range(20) if i % 7 != 3]
    assert all(s[0].shape == (3,) for s in samples)
