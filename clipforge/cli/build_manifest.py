"""Manifest commands of the `clipforge` command line: questions about a build's rows, answered from its manifest.

  clipforge manifest failures OUTPUT [--reason CODE] [--limit N] [--json]   failed rows per reason, or those of one
  clipforge manifest row OUTPUT INDEX [--json]                            one input row: status, error, key, url, ...

OUTPUT is a build's `output.path` (a folder or an fsspec URL; object-store credentials come from the
environment). The manifest (`manifest/NNNNN.parquet`, one file a shard) is the source of truth: the
post-download filters rewrite it, and a shard still being built is not in it yet. Local manifests are
read by pyarrow directly (no Python file objects), a few files at a time: on a million-row build the
per-file cost of a thousand small files is most of the time.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from clipforge.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

    from clipforge.pipeline.layout import OutputLayout

_READ_THREADS = 8
# Manifest columns shown for a failed row.
_FAILURE_COLUMNS = ["row", "shard", "key", "status", "error"]
# Columns of the shard's own parquet not added to a row's manifest fields: the manifest has them, and the
# post-download filters update it (the shard parquet keeps img2dataset's coarser statuses).
_SHARD_TABLE_SKIP = {"row", "key", "status", "error_message"}


class ManifestError(UserError):
    """No build manifest in the folder, or a manifest file that cannot be read; the message names it."""


class RowNotFound(UserError):
    """No shard manifest holds the row; the message names the row and the folder."""


# -- reading ------------------------------------------------------------------------------------------------


def _open_layout(output: str) -> tuple[OutputLayout, list[int]]:
    """The output's layout and the shards that have a manifest."""
    from clipforge.pipeline.layout import OutputLayout
    from clipforge.runtime.storage_errors import storage_errors

    with storage_errors("OUTPUT", output):
        layout = OutputLayout(output)
        shards = layout.manifest_shards()
    if not shards:
        raise ManifestError(f"{output}: no build manifest here (manifest/NNNNN.parquet); give a build's "
                            "output.path, once at least one shard is done")
    return layout, shards


def _parquet_file(layout: OutputLayout, path: str, read: Callable[[Any], Any]) -> Any:
    """`read(ParquetFile)` on one file; a damaged file is named in the error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if layout.is_local:
            # pyarrow's own file reads: several times faster than through a Python file object, and they hold
            # nothing after returning (see OutputLayout.read_table for why a remote file is read there).
            return read(pq.ParquetFile(path))
        with layout.fs.open(path, "rb") as f:
            return read(pq.ParquetFile(f))
    except pa.ArrowInvalid as e:  # not parquet, or a column missing: not a manifest clipforge wrote
        raise ManifestError(f"{path}: not a readable build manifest ({e}); delete it and run the build again "
                            "to rebuild that shard") from None


def _read(layout: OutputLayout, path: str, columns: list[str] | None = None) -> pa.Table:
    return _parquet_file(layout, path, lambda f: f.read(columns=columns, use_threads=False))


def _read_each(layout: OutputLayout, shards: list[int], read: Callable[[int], pa.Table]) -> list[pa.Table]:
    from clipforge.runtime.storage_errors import storage_errors

    with storage_errors("OUTPUT", layout.url), ThreadPoolExecutor(_READ_THREADS) as pool:
        return list(pool.map(read, shards))


def status_counts(layout: OutputLayout, shards: list[int]) -> dict[str, int]:
    """{status: rows} over every shard's manifest, most common first."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = _read_each(layout, shards, lambda s: _read(layout, layout.manifest(s), ["status"]))
    statuses = pa.chunked_array([chunk for t in tables for chunk in t.column(0).chunks], pa.string())
    counts = {c["values"]: c["counts"] for c in pc.value_counts(statuses).to_pylist()}
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def rows_with_status(layout: OutputLayout, shards: list[int], status: str, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows (in input order) whose status is `status`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def one(shard: int) -> pa.Table:
        table = _read(layout, layout.manifest(shard), _FAILURE_COLUMNS)
        codes = pc.unique(table["status"])
        names = codes.to_pylist()
        if status not in names:
            return table.slice(0, 0)
        # Compared with an Arrow scalar taken from the column: given a Python value, pyarrow imports pandas to
        # check its type, which takes longer than the whole query.
        return table.filter(pc.equal(table["status"], codes[names.index(status)]))

    found = pa.concat_tables(_read_each(layout, shards, one))
    return found.sort_by("row").slice(0, limit).to_pylist()


def _row_in(layout: OutputLayout, path: str, index: int) -> dict[str, Any] | None:
    table = _read(layout, path)
    # A list search over one shard's rows, not pyarrow.compute: given a Python value, that imports pandas to check
    # its type, which takes longer than the whole query.
    rows = table.column("row").to_pylist()
    return table.slice(rows.index(index), 1).to_pylist()[0] if index in rows else None


def _likely_shard(layout: OutputLayout, shards: list[int], index: int) -> int | None:
    """Shards hold consecutive runs of samples_per_shard rows: shard 0's length tells where a row is."""
    if shards[0] != 0:
        return None
    per_shard = _parquet_file(layout, layout.manifest(0), lambda f: f.metadata.num_rows)
    return index // per_shard if per_shard else None


def find_row(layout: OutputLayout, shards: list[int], index: int) -> dict[str, Any] | None:
    """The manifest row `index` (with the shard parquet's url, caption and extra columns), or None."""
    from clipforge.runtime.storage_errors import storage_errors

    with storage_errors("OUTPUT", layout.url):
        guess = _likely_shard(layout, shards, index)
        found = _row_in(layout, layout.manifest(guess), index) if guess is not None and guess in shards else None
    if found is None:  # not where the layout puts it (an unusual folder): look everywhere
        hits = _read_each(layout, shards, lambda s: _read(layout, layout.manifest(s), ["row"]))
        holder = next((s for s, t in zip(shards, hits) if index in set(t.column(0).to_pylist())), None)
        if holder is None:
            return None
        with storage_errors("OUTPUT", layout.url):
            found = _row_in(layout, layout.manifest(holder), index)
    assert found is not None
    with storage_errors("OUTPUT", layout.url):
        if layout.fs.exists(layout.parquet(found["shard"])):
            sample = _row_in(layout, layout.parquet(found["shard"]), index) or {}
            found.update({k: v for k, v in sample.items() if k not in _SHARD_TABLE_SKIP})
    return found


# -- commands -----------------------------------------------------------------------------------------------


def _failure_table(output: str, counts: dict[str, int], shards: int) -> str:
    total = sum(counts.values())
    ok = counts.get("ok", 0)
    lines = [f"{output}: {total:,} rows in {shards:,} shards; {ok:,} ok, {total - ok:,} failed",
             f"{'reason':<24}{'rows':>12}{'share':>9}"]
    for reason, n in counts.items():
        if reason != "ok":
            lines.append(f"{reason:<24}{n:>12,}{100 * n / max(total, 1):>8.2f}%")
    return "\n".join(lines)


def failures(
    output: str = typer.Argument(..., help="The build's output.path (folder or fsspec URL)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="List the rows of this status (http_404, ...)."),
    limit: int = typer.Option(20, "--limit", min=1, help="With --reason: at most this many rows, first rows first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Failed rows per reason (status), or with --reason the rows that failed for it."""
    layout, shards = _open_layout(output)
    if reason is None:
        counts = status_counts(layout, shards)
        if as_json:
            failed = {k: v for k, v in counts.items() if k != "ok"}
            typer.echo(json.dumps({"output": output, "shards": len(shards), "rows": sum(counts.values()),
                                   "ok": counts.get("ok", 0), "failed": sum(failed.values()), "by_reason": failed}))
        else:
            typer.echo(_failure_table(output, counts, len(shards)))
        return
    rows = rows_with_status(layout, shards, reason, limit)
    if as_json:
        typer.echo(json.dumps({"output": output, "reason": reason, "rows": rows}))
        return
    if not rows:
        typer.echo(f"{output}: no row has status `{reason}` (`clipforge manifest failures {output}` lists them)")
        return
    typer.echo(f"{'row':>10}  {'shard':>6}  error")
    for r in rows:
        typer.echo(f"{r['row']:>10}  {r['shard']:>6}  {r['error'] or ''}")


def row(
    output: str = typer.Argument(..., help="The build's output.path (folder or fsspec URL)."),
    index: int = typer.Argument(..., min=0, help="The row's index in the input (0 = the first row of the list)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of one field a line."),
) -> None:
    """One input row: its status and error, sample key and shard, URL, caption and extra columns."""
    layout, shards = _open_layout(output)
    found = find_row(layout, shards, index)
    if found is None:
        raise RowNotFound(f"{output}: no shard manifest holds row {index} ({len(shards)} shards are done; "
                          "rows count from 0 in input order)")
    if as_json:
        typer.echo(json.dumps(found, default=str))
        return
    for name, value in found.items():
        typer.echo(f"{name + ':':<18}{'' if value is None else value}")


def register(app: typer.Typer) -> None:
    """Add `manifest failures` and `manifest row` to the clipforge CLI."""
    from clipforge.cli.errors import CommandGroup

    group = typer.Typer(cls=CommandGroup, no_args_is_help=True,
                        help="Query a build's manifest: failed rows by reason, one row by index.")
    group.command("failures")(failures)
    group.command("row")(row)
    app.add_typer(group, name="manifest")
