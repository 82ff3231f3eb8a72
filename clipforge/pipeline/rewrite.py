"""Rewriting a finished shard after the post-download filters: drop samples, update its tables.

Order matters for crash safety: the tar (without the dropped samples), then the per-shard parquet
and stats, and the manifest last. Until the manifest is rewritten the dropped rows still read as
`ok`, so a build that dies half-way simply decides and rewrites again on its next run (rewriting a
tar without samples that are already gone is harmless). The tar is read and written sample by sample
with clipforge.runtime's shard reader and writer; a damaged tar stops the rewrite with an error naming it.
"""
from __future__ import annotations

import collections
from typing import Any

import pyarrow as pa

from clipforge.pipeline import status as st
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.shard_writer import MANIFEST_SCHEMA, shard_stats
from clipforge.runtime.tar_shard_reader import samples_in
from clipforge.runtime.tar_shard_writer import TarShardWriter


def conform_manifest(table: pa.Table) -> pa.Table:
    """A manifest with every current column (manifests of older builds lack the newer, nullable ones)."""
    for field in MANIFEST_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def copy_samples(layout: OutputLayout, shard: int, tar: TarShardWriter, drop_keys: set[str]) -> int:
    """Write the samples of the shard's committed tar, except those keyed `drop_keys`, into `tar`; returns how many."""
    final = layout.tar(shard)
    copied = 0
    with layout.fs.open(final, "rb") as src:
        for sample in samples_in(src, final):
            key = sample["__key__"]
            if key.rsplit("/", 1)[-1] not in drop_keys:
                tar.write(key, {field: data for field, data in sample.items() if not field.startswith("__")})
                copied += 1
    return copied


def _rewrite_tar(layout: OutputLayout, shard: int, drop_keys: set[str]) -> None:
    out = layout.open_atomic(layout.tar(shard))
    try:
        with TarShardWriter(out) as tar:
            copy_samples(layout, shard, tar, drop_keys)
        out.commit()
    except BaseException:
        out.discard()
        raise


def rewrite_shard(layout: OutputLayout, shard: int, drops: dict[int, tuple[str, str]],
                  scores: dict[int, float] | None = None) -> None:
    """Mark rows `drops` ({row: (status, message)}) as dropped and remove their samples; record `scores`.

    With no drops only the manifest is rewritten (to store new scores).
    """
    manifest_table = conform_manifest(layout.read_table(layout.manifest(shard)))
    manifest = manifest_table.to_pylist()
    if drops:
        drop_keys = {r["key"] for r in manifest if r["row"] in drops and r["key"]}
        _rewrite_tar(layout, shard, drop_keys)

        old = layout.read_table(layout.parquet(shard))
        records = old.to_pylist()
        for rec in records:
            if rec.get("row") in drops:
                code, message = drops[rec["row"]]
                rec.update(status=st.img2dataset_status(code), error_message=f"{code}: {message}",
                           width=None, height=None, original_width=None, original_height=None, sha256=None)
        layout.write_table(layout.parquet(shard), pa.Table.from_pylist(records, schema=old.schema))

    for rec in manifest:
        if rec["row"] in drops:
            code, message = drops[rec["row"]]
            rec.update(status=code, error=message, key=None)
        if scores and rec["row"] in scores:
            rec["clip_score"] = scores[rec["row"]]
    if drops:
        counts = collections.Counter(r["status"] for r in manifest)
        previous: dict[str, Any] = layout.read_json(layout.shard_stats(shard))
        layout.write_json(layout.shard_stats(shard),
                          shard_stats(counts, previous.get("start_time", 0.0), previous.get("end_time", 0.0)))
    layout.write_table(layout.manifest(shard), pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA))
