"""`clipforge manifest failures|row` on a small real build (loopback HTTP server, local Ray, real files)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipforge.cli import app
from clipforge.pipeline.build import run_build
from clipforge.pipeline.spec import BuildSpec

from build_outputs import manifest_by_row, write_url_list
from http_fixtures import ImageServer

SPS = 5  # samples per shard: 14 rows -> shards of 5, 5 and 4


def _row_url(server: ImageServer, i: int) -> str:
    if i % 4 == 1:
        return server.url(f"/status/404?row={i}")
    if i % 7 == 3:
        return server.url(f"/text?row={i}")  # HTML served as image/jpeg: not_an_image
    return server.url(f"/img/40x30.jpg?seed={i}")


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """A 14-row build in 3 shards: 8 images, 4 rows answered 404, 2 with bytes that are no image."""
    root = tmp_path_factory.mktemp("manifest-cmd")
    with ImageServer() as server:
        urls = write_url_list(root / "urls.parquet", [(_row_url(server, i), f"caption {i}") for i in range(14)])
        spec = BuildSpec.model_validate({
            "kind": "build", "name": "manifest-cmd",
            "input": {"path": str(urls)},
            "output": {"path": str(root / "out"), "samples_per_shard": SPS},
            "download": {"allow_private_networks": True, "timeout_s": 5.0, "retries": 0, "threads_per_worker": 4},
            "resize": {"size": 16, "mode": "border"},
            "scaling": {"workers": 2, "cpus_per_worker": 0.5},
        })
        run_build(spec, progress=False)
        yield root / "out", server


def invoke(*args: str):
    return CliRunner().invoke(app, ["manifest", *args])


def test_failures_counts_every_reason_of_the_manifest(built):
    out, _ = built
    statuses = [r["status"] for r in manifest_by_row(out).values()]
    expected = {s: statuses.count(s) for s in set(statuses) if s != "ok"}
    assert expected == {"http_404": 4, "not_an_image": 2}  # rows 1, 5, 9, 13; rows 3, 10

    result = invoke("failures", str(out), "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["by_reason"] == expected
    assert (answer["rows"], answer["ok"], answer["failed"], answer["shards"]) == (14, 8, 6, 3)

    table = invoke("failures", str(out))
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert "14 rows in 3 shards; 8 ok, 6 failed" in lines[0]
    assert [line.split()[:2] for line in lines[2:]] == [["http_404", "4"], ["not_an_image", "2"]]


def test_failures_of_one_reason_lists_its_rows_in_input_order(built):
    out, _ = built
    result = invoke("failures", str(out), "--reason", "http_404", "--limit", "3", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [(r["row"], r["shard"], r["status"]) for r in rows] == [(1, 0, "http_404"), (5, 1, "http_404"),
                                                                   (9, 1, "http_404")]
    assert all("404" in r["error"] for r in rows)

    none = invoke("failures", str(out), "--reason", "timeout")
    assert none.exit_code == 0 and "no row has status `timeout`" in none.output


def test_row_joins_the_manifest_and_the_shard_parquet(built):
    out, server = built
    for index in (0, 3, 12, 13):  # the first row, a bad image, rows of the last (shorter) shard
        result = invoke("row", str(out), str(index), "--json")
        assert result.exit_code == 0, result.output
        found = json.loads(result.output)
        expected = manifest_by_row(out)[index]
        assert {k: found[k] for k in expected} == expected
        assert found["url"] == _row_url(server, index) and found["caption"] == f"caption {index}"
    text = invoke("row", str(out), "12")
    assert text.exit_code == 0 and "shard:" in text.output and "status:           ok" in text.output


def test_row_is_found_where_shards_are_not_where_the_layout_puts_them(built, tmp_path):
    out, server = built
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    (copy / "manifest" / "00000.parquet").unlink()  # no shard 0 to learn the shard length from
    found = json.loads(invoke("row", str(copy), "7", "--json").output)
    assert (found["row"], found["shard"], found["url"]) == (7, 1, _row_url(server, 7))


def test_errors_name_the_row_the_folder_or_the_file(built, tmp_path):
    out, _ = built
    missing_row = invoke("row", str(out), "14")
    assert missing_row.exit_code == 1
    assert "no shard manifest holds row 14" in missing_row.output and "Traceback" not in missing_row.output

    empty = invoke("failures", str(tmp_path))
    assert empty.exit_code == 1 and f"{tmp_path}: no build manifest here" in empty.output

    broken = Path(shutil.copytree(out, tmp_path / "broken"))
    (broken / "manifest" / "00001.parquet").write_bytes(b"not parquet at all")
    damaged = invoke("failures", str(broken))
    assert damaged.exit_code == 1
    assert "manifest/00001.parquet: not a readable build manifest" in damaged.output


def test_the_readme_pyarrow_snippet_answers_the_same(built):
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    out, _ = built
    manifest = ds.dataset(out / "manifest", format="parquet")
    failed = manifest.to_table(columns=["status"], filter=pc.field("status") != "ok")
    counts = failed.group_by("status").aggregate([("status", "count")]).to_pylist()
    assert {c["status"]: c["status_count"] for c in counts} == {"http_404": 4, "not_an_image": 2}
    one = manifest.to_table(filter=pc.field("row") == 3).to_pylist()
    assert len(one) == 1 and one[0]["status"] == "not_an_image"
