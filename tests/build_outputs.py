"""Writing URL lists for the builder and reading back what it wrote (local output folders)."""
from __future__ import annotations

import collections
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_url_list(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A parquet URL list with `url` and `caption` columns."""
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}), path)
    return path


def manifest_rows(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted((out / "manifest").glob("*.parquet"))]
    return pa.concat_tables(tables).to_pylist() if tables else []


def manifest_by_row(out: Path) -> dict[int, dict]:
    return {r["row"]: r for r in manifest_rows(out)}


def tar_members(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over every visible tar; fails on a member seen twice."""
    found: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                assert ext not in found[key], f"{key}.{ext} appears twice ({path.name})"
                found[key][ext] = tar.extractfile(m).read()
    return dict(found)
