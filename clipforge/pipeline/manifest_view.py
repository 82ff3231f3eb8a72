"""All manifests of a build in one driver-side view, in input-row order, with statuses that can change.

The post-download filters read it, drop rows by changing their status here, and report which
shards must be rewritten. Only the small columns are held, and compactly: Python lists of one fresh
object a value took ~850 MB for a million rows, most of what the driver may use. Here statuses and
shard numbers share one object per distinct value, row numbers sit in a machine-integer array,
content and perceptual hashes are raw bytes, rows in input order need no position table, and the
manifests are turned into columns a few shards at a time (about 150 MB for a million rows).
"""
from __future__ import annotations

import array
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Mapping, Sequence, overload

import numpy as np
import pyarrow as pa

from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.rewrite import conform_manifest

_READ_THREADS = 8
_READ_WINDOW = 64  # shards read ahead: their tables are all that is held besides the view
COLUMNS = ("row", "status", "key", "shard", "content_sha256", "phash", "clip_score")


class _HexColumn(Sequence):
    """Fixed-width lowercase hex strings (or None) kept as raw bytes; indexing gives back the same string.

    A value that would not come back the same (another width, upper case, not hex) is kept as it is, aside.
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.raw = bytearray()
        self.present = bytearray()
        self.other: dict[int, str] = {}

    def _pack(self, text: str | None) -> bytes | None:
        if text is None or len(text) != 2 * self.nbytes:
            return None
        try:
            packed = bytes.fromhex(text)
        except ValueError:
            return None
        return packed if packed.hex() == text else None

    def extend(self, values: Iterable[str | None]) -> None:
        for text in values:
            packed = self._pack(text)
            if packed is None and text is not None:
                self.other[len(self.present)] = text
            self.present.append(packed is not None)
            self.raw += bytes(self.nbytes) if packed is None else packed

    def __len__(self) -> int:
        return len(self.present)

    @overload
    def __getitem__(self, i: int) -> str | None: ...

    @overload
    def __getitem__(self, i: slice) -> list[str | None]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not self.present[i]:  # IndexError past the end, as a list
            return self.other.get(i)
        return self.raw[i * self.nbytes:(i + 1) * self.nbytes].hex()


class _Consecutive(Mapping):
    """{row: position} for rows first, first + 1, ... in order: computed, not stored."""

    def __init__(self, first: int, count: int):
        self.first = first
        self.count = count

    def __getitem__(self, row: int) -> int:
        if not self.first <= row < self.first + self.count:
            raise KeyError(row)
        return row - self.first

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.first + self.count))

    def __len__(self) -> int:
        return self.count


class ManifestView:
    def __init__(self, tables: Iterable[pa.Table]):
        """The rows of `tables` (manifests with the COLUMNS) in row order; shards given in order are taken one at a
        time as they are, others sorted once at the end."""
        self.row: Sequence[int] = array.array("q")
        self.status: list[str] = []
        self.key: list[str | None] = []
        self.shard: list[int] = []
        self.content_sha256: Sequence[str | None] = _HexColumn(32)
        self.phash: Sequence[str | None] = _HexColumn(8)
        self.clip_score: list[float | None] = []
        self._statuses: dict[str, str] = {}
        self._shards: dict[int, int] = {}
        for table in tables:
            self._extend(table)
        rows = np.frombuffer(self.row, dtype=np.int64)
        if (rows[1:] <= rows[:-1]).any():
            rows = self._sort(rows)
        self.position: Mapping[int, int] = (
            _Consecutive(int(rows[0]) if len(rows) else 0, len(rows)) if (rows[1:] - rows[:-1] == 1).all()
            else {row: i for i, row in enumerate(self.row)}
        )
        # {shard: {row: (status, message)}} decided by the filters so far
        self.drops: dict[int, dict[int, tuple[str, str]]] = {}
        self.new_scores: dict[int, dict[int, float]] = {}

    def _extend(self, table: pa.Table) -> None:
        assert isinstance(self.row, array.array)
        assert isinstance(self.content_sha256, _HexColumn) and isinstance(self.phash, _HexColumn)
        self.row.frombytes(table.column("row").to_numpy().astype(np.int64).tobytes())
        # Statuses and shard numbers: one object per distinct value, 8 bytes a row.
        self.status.extend(self._statuses.setdefault(v, v) for v in table.column("status").to_pylist())
        self.shard.extend(self._shards.setdefault(v, v) for v in table.column("shard").to_pylist())
        self.key.extend(table.column("key").to_pylist())
        self.content_sha256.extend(table.column("content_sha256").to_pylist())
        self.phash.extend(table.column("phash").to_pylist())
        self.clip_score.extend(table.column("clip_score").to_pylist())

    def _sort(self, rows: np.ndarray) -> np.ndarray:
        """Put the rows in row order (stable: equal rows keep their order); returns the sorted row numbers."""
        order = np.argsort(rows, kind="stable").tolist()
        self.status = [self.status[i] for i in order]
        self.key = [self.key[i] for i in order]
        self.shard = [self.shard[i] for i in order]
        self.clip_score = [self.clip_score[i] for i in order]
        for name, nbytes in (("content_sha256", 32), ("phash", 8)):
            column = _HexColumn(nbytes)
            column.extend(getattr(self, name)[i] for i in order)
            setattr(self, name, column)
        self.row = array.array("q", rows[order].tobytes())
        return rows[order]

    @classmethod
    def read(cls, layout: OutputLayout, shards: list[int]) -> "ManifestView":
        def one(shard: int) -> pa.Table:
            return conform_manifest(layout.read_table(layout.manifest(shard))).select(list(COLUMNS))

        def in_order() -> Iterator[pa.Table]:
            with ThreadPoolExecutor(_READ_THREADS) as pool:
                for start in range(0, len(shards), _READ_WINDOW):
                    yield from pool.map(one, shards[start:start + _READ_WINDOW])

        return cls(in_order())

    def __len__(self) -> int:
        return len(self.row)

    def indices_with_status(self, *codes: str) -> Iterator[int]:
        """Positions (in row order) whose current status is one of `codes`; safe to drop rows while iterating."""
        wanted = set(codes)
        for i, code in enumerate(self.status):
            if code in wanted:
                yield i

    def drop(self, row: int, code: str, message: str) -> None:
        i = self.position[row]
        self.status[i] = code
        self.key[i] = None
        self.drops.setdefault(self.shard[i], {})[row] = (code, message)

    def set_score(self, row: int, score: float) -> None:
        i = self.position[row]
        self.clip_score[i] = score
        self.new_scores.setdefault(self.shard[i], {})[row] = score

    def shards_to_rewrite(self) -> list[int]:
        return sorted(set(self.drops) | set(self.new_scores))
