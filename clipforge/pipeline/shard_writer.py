"""Writing one shard: the WebDataset tar as samples arrive, then the per-shard parquet, stats and manifest.

The tar is written through clipforge.runtime.tar_shard_writer (webdataset's TarWriter) onto the output
layout's atomic file, so it appears under its final name only when committed. Outcomes arrive in
completion order (a slow URL must not hold back the rest), so the order of samples in the tar can
differ between runs; keys and contents do not. The tables are sorted by input row.
"""
from __future__ import annotations

import collections
import json
import time
from typing import Any

import pyarrow as pa

from clipforge.pipeline import status as st
from clipforge.pipeline.layout import OutputLayout, sample_key
from clipforge.pipeline.sample import RowOutcome, caption_text
from clipforge.runtime.tar_shard_writer import TarShardWriter

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("key", pa.string()),
        pa.field("shard", pa.int64()),
        pa.field("content_sha256", pa.string()),
        # 64-bit perceptual hash of the stored image (16 hex digits), for the near-duplicate filter.
        pa.field("phash", pa.string()),
        # Image-caption similarity, once the CLIP-score filter has scored the row.
        pa.field("clip_score", pa.float32()),
    ]
)

# The per-shard parquet's own columns (img2dataset's, plus `row`); extra input columns sit after caption.
_SHARD_COLUMNS = [
    ("key", pa.string()),
    ("row", pa.int64()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("sha256", pa.string()),
]


def sample_json(outcome: RowOutcome, key: str) -> dict[str, Any]:
    img = outcome.image
    assert img is not None
    return {
        "url": None if outcome.row.url is None else str(outcome.row.url),
        "caption": outcome.row.caption,
        "key": key,
        "row": outcome.row.row,
        "status": "success",
        "error_message": None,
        "width": img.width,
        "height": img.height,
        "original_width": img.original_width,
        "original_height": img.original_height,
        "sha256": img.sha256,
        "content_sha256": outcome.content_sha256,
        **outcome.row.extras,
    }


def _column(values: list[Any], type_: pa.DataType | None = None) -> pa.Array:
    if type_ is not None:
        return pa.array(values, type=type_)
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        # Mixed types in an extra column: keep them readable as text rather than fail the shard.
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


class ShardWriter:
    """Accumulates one shard's outcomes; `commit()` makes the shard visible, `discard()` drops it."""

    def __init__(self, layout: OutputLayout, shard: int, image_format: str, digits: int, extra_cols: list[str]):
        self.layout = layout
        self.shard = shard
        self.image_format = image_format
        self.digits = digits
        self.extra_cols = extra_cols
        self.outcomes: list[RowOutcome] = []
        self.started = time.time()
        layout.remove_stale_temps(shard)
        self._file = layout.open_atomic(layout.tar(shard))
        try:
            self._tar = TarShardWriter(self._file, mtime=self.started)
        except BaseException:
            self._file.discard()
            raise

    def key(self, outcome: RowOutcome) -> str:
        return sample_key(self.shard, outcome.index, self.digits)

    def add(self, outcome: RowOutcome) -> None:
        if outcome.ok and outcome.image is not None:
            key = self.key(outcome)
            meta = json.dumps(sample_json(outcome, key), indent=2, default=str).encode()
            self._tar.write(key, {self.image_format: outcome.image.data,
                                  "txt": caption_text(outcome.row.caption).encode(), "json": meta})
            outcome.image.data = b""  # written; the rest of the outcome is small and kept for the tables
        self.outcomes.append(outcome)

    def discard(self) -> None:
        try:
            self._tar.close()
        finally:
            self._file.discard()

    def commit(self) -> dict[str, Any]:
        """Close and move the tar into place, then write parquet, stats and (last) the manifest.

        The summary counts the rows this writer was given (for a patch, only the rows downloaded again).
        """
        self._tar.close()
        self._file.commit()
        self.outcomes.sort(key=lambda o: o.row.row)
        shard_table, manifest = self._tables()
        self.layout.write_table(self.layout.parquet(self.shard), shard_table)
        ended = time.time()
        counts = collections.Counter(manifest.column("status").to_pylist())
        self.layout.write_json(self.layout.shard_stats(self.shard), shard_stats(counts, self.started, ended))
        self.layout.write_table(self.layout.manifest(self.shard), manifest)
        return {"shard": self.shard, "rows": len(self.outcomes),
                "status_counts": dict(collections.Counter(o.status for o in self.outcomes)),
                "seconds": ended - self.started}

    def _tables(self) -> tuple[pa.Table, pa.Table]:
        """The shard's parquet and its manifest, as committed."""
        return self._shard_table(), self._manifest_table()

    def _manifest_table(self) -> pa.Table:
        rows = self.outcomes
        return pa.Table.from_arrays(
            [
                pa.array([o.row.row for o in rows], pa.int64()),
                pa.array([o.status for o in rows], pa.string()),
                pa.array([o.error for o in rows], pa.string()),
                pa.array([self.key(o) if o.ok else None for o in rows], pa.string()),
                pa.array([self.shard] * len(rows), pa.int64()),
                pa.array([o.content_sha256 for o in rows], pa.string()),
                pa.array([o.image.phash if o.ok and o.image else None for o in rows], pa.string()),
                pa.array([None] * len(rows), pa.float32()),
            ],
            schema=MANIFEST_SCHEMA,
        )

    def _shard_table(self) -> pa.Table:
        rows = self.outcomes
        img = [o.image if o.ok else None for o in rows]
        columns: dict[str, pa.Array] = {
            "url": _column([None if o.row.url is None else str(o.row.url) for o in rows], pa.string()),
            "caption": _column([None if o.row.caption is None else str(o.row.caption) for o in rows], pa.string()),
        }
        for col in self.extra_cols:
            columns[col] = _column([o.row.extras.get(col) for o in rows])
        values: dict[str, list[Any]] = {
            "key": [self.key(o) for o in rows],
            "row": [o.row.row for o in rows],
            "status": [st.img2dataset_status(o.status) for o in rows],
            "error_message": [None if o.ok else f"{o.status}: {o.error}" for o in rows],
            "width": [i.width if i else None for i in img],
            "height": [i.height if i else None for i in img],
            "original_width": [i.original_width if i else None for i in img],
            "original_height": [i.original_height if i else None for i in img],
            "sha256": [i.sha256 if i else None for i in img],
        }
        for name, type_ in _SHARD_COLUMNS:
            columns[name] = _column(values[name], type_)
        return pa.table(columns)


def shard_stats(counts: collections.Counter | dict, started: float, ended: float) -> dict[str, Any]:
    """img2dataset's `{shard}_stats.json` fields, plus the fine-grained status codes."""
    coarse: collections.Counter[str] = collections.Counter()
    for code, n in counts.items():
        coarse[st.img2dataset_status(code)] += n
    return {
        "count": sum(counts.values()),
        "successes": coarse["success"],
        "failed_to_download": coarse["failed_to_download"],
        "failed_to_resize": coarse["failed_to_resize"],
        "filtered": coarse["filtered"],
        "duration": ended - started,
        "start_time": started,
        "end_time": ended,
        "status_dict": dict(sorted(counts.items())),
    }
