"""The post-download filters' ManifestView: compact columns that read back exactly as the manifests hold them."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from clipforge.pipeline.manifest_view import COLUMNS, ManifestView
from clipforge.pipeline.rewrite import conform_manifest


def manifest(rows: list[int], shard: int) -> pa.Table:
    """A manifest whose hashes include odd values (upper case, wrong width, not hex) and missing ones."""
    phash = [f"{r:016x}" if r % 5 else ("ABCDEF0123456789" if r % 2 else "xyz") for r in rows]
    return conform_manifest(pa.table({
        "row": pa.array(rows, pa.int64()),
        "status": ["ok" if r % 3 else "http_404" for r in rows],
        "key": [f"{r:08d}" if r % 3 else None for r in rows],
        "shard": [shard] * len(rows),
        "content_sha256": [f"{r * 7919:064x}" if r % 3 else None for r in rows],
        "phash": phash,
        "clip_score": pa.array([0.5 if r % 4 == 0 else None for r in rows], pa.float32()),
    })).select(list(COLUMNS))


def shards(layout: str) -> list[pa.Table]:
    rows = [list(range(s * 10, s * 10 + 10)) for s in range(5)]
    if layout == "gap":
        rows[2] = [r + 100 for r in rows[2]]
    tables = [manifest(r, i) for i, r in enumerate(rows)]
    if layout == "shuffled":
        random.Random(1).shuffle(tables)
    return tables


@pytest.mark.parametrize("layout", ["in_order", "shuffled", "gap"])
def test_columns_read_back_as_the_sorted_manifests_hold_them(layout):
    tables = shards(layout)
    view = ManifestView(tables)
    expected = pa.concat_tables(tables).sort_by("row")
    for name in COLUMNS:
        assert list(getattr(view, name)) == expected.column(name).to_pylist(), name
    assert [view.position[r] for r in expected.column("row").to_pylist()] == list(range(len(view)))
    assert type(view.row[3]) is int and type(view.shard[3]) is int
    with pytest.raises(KeyError):
        view.position[10_000]


def test_drops_and_scores_change_the_view_and_name_the_shards_to_rewrite():
    view = ManifestView(shards("in_order"))
    view.drop(12, "duplicate", "same image as row 11")
    view.set_score(31, 0.25)
    i = view.position[12]
    assert (view.status[i], view.key[i]) == ("duplicate", None)
    assert view.clip_score[view.position[31]] == 0.25
    assert view.drops == {1: {12: ("duplicate", "same image as row 11")}} and view.new_scores == {3: {31: 0.25}}
    assert view.shards_to_rewrite() == [1, 3]
    assert 12 not in set(view.indices_with_status("ok")) and 11 in set(view.indices_with_status("ok"))


def test_an_empty_build_gives_an_empty_view():
    view = ManifestView([])
    assert len(view) == 0 and list(view.indices_with_status("ok")) == [] and view.shards_to_rewrite() == []
