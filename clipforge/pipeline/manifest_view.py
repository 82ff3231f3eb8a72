"""All manifests of a build in one driver-side view, in input-row order, with statuses that can change.

The post-download filters read it, drop rows by changing their status here, and report which
shards must be rewritten. Only the small columns are held (about 200 bytes per row).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa

from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.rewrite import conform_manifest

_READ_THREADS = 8
COLUMNS = ("row", "status", "key", "shard", "content_sha256", "phash", "clip_score")


class ManifestView:
    def __init__(self, table: pa.Table):
        table = table.sort_by("row")
        for name in COLUMNS:
            setattr(self, name, table.column(name).to_pylist())
        self.position = {row: i for i, row in enumerate(self.row)}
        # {shard: {row: (status, message)}} decided by the filters so far
        self.drops: dict[int, dict[int, tuple[str, str]]] = {}
        self.new_scores: dict[int, dict[int, float]] = {}

    row: list[int]
    status: list[str]
    key: list[str | None]
    shard: list[int]
    content_sha256: list[str | None]
    phash: list[str | None]
    clip_score: list[float | None]

    @classmethod
    def read(cls, layout: OutputLayout, shards: list[int]) -> "ManifestView":
        def one(shard: int) -> pa.Table:
            return conform_manifest(layout.read_table(layout.manifest(shard))).select(list(COLUMNS))

        with ThreadPoolExecutor(_READ_THREADS) as pool:
            tables = list(pool.map(one, shards))
        if not tables:
            empty = conform_manifest(pa.table({"row": pa.array([], pa.int64())}))
            return cls(empty.select(list(COLUMNS)))
        return cls(pa.concat_tables(tables))

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
