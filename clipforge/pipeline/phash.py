"""64-bit DCT perceptual hashes and a Hamming-distance index over them, for near-duplicate detection.

The hash: greyscale, shrunk to 32x32, 2-D DCT-II, the 8x8 lowest frequencies compared with their
median (one bit each). Re-encoding, resizing and mild colour or contrast changes move few bits;
different pictures differ in about half of them.

The index finds a stored hash within distance `d` of a query without comparing against every
stored hash (multi-index hashing): the 64 bits are cut into `m` chunks; two hashes within distance
`d` have at least one chunk within distance `d // m` of each other (pigeonhole), so only hashes
sharing such a chunk value are compared. With `m = d + 1` (used up to d = 7, chunks of >= 8 bits)
that is an exact chunk match; beyond, 8 chunks of 8 bits and their few neighbours are probed.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
from PIL import Image

HASH_SIZE = 8
_SAMPLE = 32


@lru_cache(maxsize=1)
def _dct_rows() -> np.ndarray:
    """The first HASH_SIZE rows of the orthonormal DCT-II matrix of size _SAMPLE."""
    n = np.arange(_SAMPLE)
    k = np.arange(HASH_SIZE)[:, None]
    mat = np.cos(np.pi * (2 * n + 1) * k / (2 * _SAMPLE)) * np.sqrt(2.0 / _SAMPLE)
    mat[0] /= np.sqrt(2.0)
    return mat


def phash(img: Image.Image) -> int:
    """The 64-bit perceptual hash of an image, as an unsigned int (bit 63 = lowest frequency)."""
    grey = img.convert("L").resize((_SAMPLE, _SAMPLE), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.float64)
    d = _dct_rows()
    low = (d @ pixels @ d.T).ravel()  # HASH_SIZE x HASH_SIZE lowest frequencies
    ordered = np.sort(low)
    median = 0.5 * (ordered[low.size // 2 - 1] + ordered[low.size // 2])  # np.median costs 10x more
    return int(np.packbits(low > median).view(">u8")[0])


def to_hex(value: int) -> str:
    return f"{value:016x}"


def from_hex(text: str) -> int:
    return int(text, 16)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _chunk_bounds(chunks: int) -> list[tuple[int, int]]:
    """(shift, width) of each chunk; widths differ by at most one bit."""
    base, extra = divmod(64, chunks)
    bounds, shift = [], 64
    for i in range(chunks):
        width = base + (1 if i < extra else 0)
        shift -= width
        bounds.append((shift, width))
    return bounds


@lru_cache(maxsize=64)
def _flip_masks(width: int, radius: int) -> tuple[int, ...]:
    """Every mask of at most `radius` set bits within `width` bits (0 first)."""
    masks = [0]
    for r in range(1, radius + 1):
        for combo in itertools.combinations(range(width), r):
            masks.append(sum(1 << b for b in combo))
    return tuple(masks)


class NearDuplicateIndex:
    """Hashes added so far, searchable for one within `max_distance` of a query."""

    def __init__(self, max_distance: int):
        if not 0 <= max_distance < 64:
            raise ValueError(f"max_distance must be in [0, 63], got {max_distance}")
        self.max_distance = max_distance
        chunks = max_distance + 1 if max_distance <= 7 else 8
        self.radius = max_distance // chunks
        self.bounds = _chunk_bounds(chunks)
        self.buckets: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def _chunks(self, value: int):
        for i, (shift, width) in enumerate(self.bounds):
            yield i, (value >> shift) & ((1 << width) - 1), width

    def find(self, value: int) -> tuple[int, int] | None:
        """(item, distance) of the first-added stored hash within max_distance of `value`, or None."""
        best: tuple[int, int] | None = None
        seen: set[int] = set()
        for i, chunk, width in self._chunks(value):
            for mask in _flip_masks(width, self.radius):
                for stored, item in self.buckets.get((i, chunk ^ mask), ()):
                    if item in seen:
                        continue
                    seen.add(item)
                    dist = hamming(stored, value)
                    if dist <= self.max_distance and (best is None or item < best[0]):
                        best = (item, dist)
        return best

    def add(self, value: int, item: int) -> None:
        for i, chunk, _width in self._chunks(value):
            self.buckets.setdefault((i, chunk), []).append((value, item))
