"""What a re-run does with the shards an earlier run finished (`incremental`), and which rows it downloads again.

`retry_failed` downloads again the rows of finished shards whose failure may pass (`status.is_transient`), and
nothing else. The post-download filters then decide again over the whole output, so the final set is the one
a clean build would keep: exact de-duplication and a CLIP-score threshold only ever drop more when more rows
succeed, and what they dropped before stays dropped in a clean build too. The near-duplicate filter and a
CLIP-score `top_fraction` are not like that: a row they dropped may be kept once other rows change (the row it
looked like is now dropped itself, the top fraction is taken of more rows). Their samples are gone from the
tars, so when rows are retried with one of these filters on, the rows they dropped are downloaded again too.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from clipforge.pipeline import status as st
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.spec import FilterSpec

_READ_THREADS = 8


def restored_codes(filters: FilterSpec) -> set[str]:
    """Codes of rows dropped by a filter whose choice can change when more rows succeed (see module doc)."""
    codes = set()
    if filters.near_dup_max_distance is not None:
        codes.add(st.NEAR_DUPLICATE)
    if filters.clip_score is not None and filters.clip_score.top_fraction is not None:
        codes.add(st.FILTERED_CLIP_SCORE)
    return codes


def rows_to_retry(layout: OutputLayout, shards: set[int], filters: FilterSpec) -> dict[int, set[int]]:
    """{shard: input rows to download again} over the given finished shards, read from their manifests."""
    def read(shard: int) -> tuple[list[int], list[str]]:
        table = layout.read_table(layout.manifest(shard), ["row", "status"])
        return table.column("row").to_pylist(), table.column("status").to_pylist()

    ordered = sorted(shards)
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        manifests = dict(zip(ordered, pool.map(read, ordered)))
    if not any(st.is_transient(code) for _, codes in manifests.values() for code in codes):
        return {}
    restore = restored_codes(filters)
    found: dict[int, set[int]] = {}
    for shard, (rows, codes) in manifests.items():
        redo = {row for row, code in zip(rows, codes) if st.is_transient(code) or code in restore}
        if redo:
            found[shard] = redo
    return found
