"""IDX files (the MNIST / Fashion-MNIST format), plain or gzipped, from local or fsspec paths.

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, one big-endian
uint32 size per dimension, then the values in C order. Image files are [N, rows, cols]; label files [N].
"""
from __future__ import annotations

import gzip
import struct

import fsspec
import numpy as np
from numpy.typing import DTypeLike

_TYPES: dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
                                0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: IDX file not found") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from None
    return data


def read_idx(path: str) -> np.ndarray:
    """The array stored in one IDX file (gzip detected from the content, not the name)."""
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (it must start with two zero bytes, a type code and a rank)")
    type_code, ndim = data[2], data[3]
    if type_code not in _TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    if ndim < 1:
        raise ValueError(f"{path}: IDX rank must be >= 1, got {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header cut off ({len(data)} bytes, rank {ndim} needs {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_TYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX shape {list(shape)} needs {expected} bytes of values, the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx_images(images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, rows, cols] and int64 labels [N] from a pair of IDX files, checked against each other."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"{images}: expected uint8 images [N, rows, cols], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1:
        raise ValueError(f"{labels}: expected a label vector [N], got shape {list(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{labels}: negative label {int(y.min())}")
    return x, y.astype(np.int64)
