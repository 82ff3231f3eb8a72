"""Exact de-duplication across shards: identical downloaded bytes keep only their first row.

Shards are built in parallel, so "first" can only be decided once all are done. This pass runs on
the driver after the downloads: it reads every manifest (row, status, content hash), walks rows in
input order keeping a set of hashes seen among `ok` rows, and rewrites only the shards that hold a
duplicate (tar without those samples, parquet, stats, then manifest). It costs ~100 bytes of driver
memory per successful row and re-reads only affected shards. Re-running it is harmless: rows already
marked `duplicate` are not `ok`, and a crash between a shard's rewrites is repaired by the next run
because the manifest is rewritten last.
"""
from __future__ import annotations

import collections
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from clipforge.pipeline import status as st
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.shard_writer import shard_stats

_READ_THREADS = 8


def find_duplicates(layout: OutputLayout, shards: list[int]) -> dict[int, dict[int, int]]:
    """{shard: {row: first_row}} for every `ok` row whose content hash an earlier `ok` row has."""
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        tables = list(pool.map(
            lambda s: layout.read_table(layout.manifest(s), ["row", "status", "content_sha256", "shard"]), shards
        ))
    if not tables:
        return {}
    table = pa.concat_tables(tables).sort_by("row")
    first_of: dict[str, int] = {}
    dups: dict[int, dict[int, int]] = collections.defaultdict(dict)
    cols = [table.column(c).to_pylist() for c in ("row", "status", "content_sha256", "shard")]
    for row, code, digest, shard in zip(*cols):
        if code != st.OK or digest is None:
            continue
        first = first_of.setdefault(digest, row)
        if first != row:
            dups[shard][row] = first
    return dict(dups)


def _rewrite_tar(layout: OutputLayout, shard: int, drop_keys: set[str]) -> None:
    final = layout.tar(shard)
    tmp = layout.temp_for(final)
    try:
        with layout.fs.open(final, "rb") as src, tarfile.open(fileobj=src, mode="r|") as tin, \
                layout.fs.open(tmp, "wb") as dst, tarfile.open(fileobj=dst, mode="w|",
                                                               format=tarfile.USTAR_FORMAT) as tout:
            for member in tin:
                base = member.name.rsplit("/", 1)[-1]
                if base.split(".", 1)[0] in drop_keys:
                    continue
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
        layout.commit(tmp, final)
    except BaseException:
        layout.remove_quietly(tmp)
        raise


def _rewrite_shard(layout: OutputLayout, shard: int, dup_rows: dict[int, int]) -> int:
    manifest_table = layout.read_table(layout.manifest(shard))
    manifest = manifest_table.to_pylist()
    drop_keys = {r["key"] for r in manifest if r["row"] in dup_rows and r["key"]}
    _rewrite_tar(layout, shard, drop_keys)

    message = {row: f"same image as row {first}" for row, first in dup_rows.items()}
    old = layout.read_table(layout.parquet(shard))
    records = old.to_pylist()
    for rec in records:
        if rec.get("row") in message:
            rec.update(status=st.img2dataset_status(st.DUPLICATE), error_message=f"duplicate: {message[rec['row']]}",
                       width=None, height=None, original_width=None, original_height=None, sha256=None)
    layout.write_table(layout.parquet(shard), pa.Table.from_pylist(records, schema=old.schema))

    for rec in manifest:
        if rec["row"] in message:
            rec.update(status=st.DUPLICATE, error=message[rec["row"]], key=None)
    counts = collections.Counter(r["status"] for r in manifest)
    previous: dict[str, Any] = layout.read_json(layout.shard_stats(shard))
    layout.write_json(layout.shard_stats(shard),
                      shard_stats(counts, previous.get("start_time", 0.0), previous.get("end_time", 0.0)))
    layout.write_table(layout.manifest(shard), pa.Table.from_pylist(manifest, schema=manifest_table.schema))
    return len(dup_rows)


def dedup_exact(layout: OutputLayout, shards: list[int]) -> dict[str, int]:
    """Mark exact duplicates in the given shards; returns how many rows and shards changed."""
    dups = find_duplicates(layout, shards)
    marked = sum(_rewrite_shard(layout, shard, rows) for shard, rows in sorted(dups.items()))
    return {"duplicates_marked": marked, "shards_rewritten": len(dups)}
