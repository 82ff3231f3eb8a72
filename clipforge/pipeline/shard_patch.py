"""Patching a committed shard (`incremental: retry_failed`): some of its rows downloaded again, the rest kept.

The new tar holds the shard's other samples, copied unchanged from the committed tar, and the samples of the
rows downloaded again that are now `ok`; the per-shard parquet, stats and manifest keep every other row as it
was and take the fresh outcome of each row downloaded again. Everything is committed as for a new shard
(`ShardWriter`: the tar, then parquet and stats, the manifest last), so a patch that dies leaves the shard as
it was or, once its tar is committed, a tar that the next patch rewrites: samples of the rows being redone
are never copied, so none appears twice.
"""
from __future__ import annotations

import pyarrow as pa

from clipforge.pipeline.layout import OutputLayout, sample_key
from clipforge.pipeline.rewrite import conform_manifest, copy_samples
from clipforge.pipeline.shard_writer import ShardWriter


def merged(old: pa.Table, new: pa.Table, redone: set[int]) -> pa.Table:
    """`old` without the rows `redone`, plus `new` (the fresh outcomes of those rows), in row order."""
    kept = old.filter(pa.array([row not in redone for row in old.column("row").to_pylist()], pa.bool_()))
    try:
        new = new.select(kept.column_names).cast(kept.schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass  # other columns than before (input.extra_cols changed): joined by name below, the gaps null
    return pa.concat_tables([kept, new], promote_options="permissive").sort_by("row")


class ShardPatch(ShardWriter):
    """A ShardWriter for the rows `redo` ({row: position in the shard}) of an already committed shard."""

    def __init__(self, layout: OutputLayout, shard: int, image_format: str, digits: int, extra_cols: list[str],
                 redo: dict[int, int]):
        super().__init__(layout, shard, image_format, digits, extra_cols)
        self.redo = redo
        try:
            copy_samples(layout, shard, self._tar, {sample_key(shard, pos, digits) for pos in redo.values()})
        except BaseException:
            self.discard()
            raise

    def _tables(self) -> tuple[pa.Table, pa.Table]:
        new_shard_table, new_manifest = super()._tables()
        redone = set(self.redo)
        old_shard_table = self.layout.read_table(self.layout.parquet(self.shard))
        old_manifest = conform_manifest(self.layout.read_table(self.layout.manifest(self.shard)))
        return merged(old_shard_table, new_shard_table, redone), merged(old_manifest, new_manifest, redone)
