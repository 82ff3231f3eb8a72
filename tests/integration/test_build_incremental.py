"""Re-runs of a finished build (`incremental`), builds that end with too few successes, and sizes.json.

Real loopback servers answer some rows with a 500, a 429 or no answer in time on the first request and with an
image later; the server counts requests per path, so a retry is seen to ask for exactly the rows it should.
A clean build of the same URL list on the same (by then recovered) server is the reference a retried build
must equal: the same manifest, the same samples byte for byte, the same sizes.json.
"""
from __future__ import annotations

import collections
import json
import time
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from clipforge.cli import app
from clipforge.pipeline.build import run_build
from clipforge.pipeline.errors import TooFewSuccessesError
from clipforge.pipeline.spec import BuildSpec
from clipforge.runtime.tar_shard_reader import iter_shard_samples

from build_outputs import manifest_by_row, manifest_rows, tar_members, write_url_list
from http_fixtures import ImageServer, _Handler
from ports import free_port

TIMEOUT_S = 1.0


class _RecoveringHandler(_Handler):
    """The fixture routes plus `/late/NAME?fails=K&delay=S`: no answer for S seconds to the first K requests of
    NAME (the client times out first), then at once an image of its own."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self.path.startswith("/late/"):
            super().do_GET()
            return
        path, _, query = self.path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        with self.server.lock:
            self.server.hits[path] += 1
            count = self.server.hits[path]
        if count <= int(params.get("fails", 1)):
            self.server.gate.wait(float(params.get("delay", 4 * TIMEOUT_S)))
            self.close_connection = True
            return  # hang up without an answer: the client timed out long before
        self._image(seed=zlib.crc32(path.encode()) % 1000)


class RecoveringServer(ImageServer):
    handler = _RecoveringHandler


def spec_dict(inp: Path, out: Path, sps: int, **top) -> dict:
    return {
        "kind": "build",
        "name": "incremental-test",
        "input": {"path": str(inp)},
        "output": {"path": str(out), "samples_per_shard": sps},
        # No retries within a run: every transient failure is left for the next run to retry.
        "download": {"allow_private_networks": True, "timeout_s": TIMEOUT_S, "retries": 0, "threads_per_worker": 4},
        "resize": {"size": 24, "mode": "border"},
        "filters": {"dedup_exact": True},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
        **top,
    }


def build(inp: Path, out: Path, sps: int, **top) -> dict:
    return run_build(BuildSpec.model_validate(spec_dict(inp, out, sps, **top)), progress=False)


def shard_sample_counts(out: Path) -> dict[str, int]:
    """{tar name: samples}, read from the tars themselves."""
    return {p.name: sum(1 for _ in iter_shard_samples(str(p), with_data=False)) for p in sorted(out.glob("*.tar"))}


def sizes(out: Path) -> dict[str, int]:
    return json.loads((out / "sizes.json").read_text())


def shard_tables(out: Path) -> list[dict]:
    return [row for p in sorted(out.glob("[0-9]*.parquet")) for row in pq.read_table(p).to_pylist()]


def file_times(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def requests_between(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
    return {path: n - before[path] for path, n in after.items() if n != before[path]}


# -- retry_failed -----------------------------------------------------------------------------------------------


def _recovering_rows(server: ImageServer) -> list[tuple[str, str]]:
    """12 rows in 4 shards of 3: rows 1, 3 and 5 fail once (500, no answer, 429), row 4 (a refused connection)
    every time, rows 2, 6 and 10 for good; row 8 has row 1's image, so it is kept until row 1 succeeds and is a
    duplicate after; shard 3 (rows 9-11) has nothing to retry."""
    u = server.url
    row1_image = zlib.crc32(b"/flaky/a") % 1000  # what /flaky/a answers once it succeeds
    return [
        (u("/img/40x30.jpg?seed=100"), "row 0"),
        (u("/flaky/a?fails=1&code=500"), "row 1: 500 once"),
        (u("/status/404"), "row 2: missing"),
        (u(f"/late/b?fails=1&delay={4 * TIMEOUT_S}"), "row 3: no answer once"),
        (f"http://127.0.0.1:{free_port()}/x.jpg", "row 4: nobody listens"),
        (u("/flaky/c?fails=1&code=429"), "row 5: rate limited once"),
        (u("/text"), "row 6: not an image"),
        (u("/img/40x30.jpg?seed=107"), "row 7"),
        (u(f"/img/64x48.jpg?seed={row1_image}"), "row 8: row 1's image"),
        (u("/img/40x30.jpg?seed=109"), "row 9"),
        (u("/status/410"), "row 10: gone"),
        (u("/img/40x30.jpg?seed=111"), "row 11"),
    ]


def test_retry_failed_downloads_only_transient_failures_and_ends_as_a_clean_build(ray_local, tmp_path):
    with RecoveringServer() as server:
        rows = _recovering_rows(server)
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        out, reference = tmp_path / "out", tmp_path / "reference"

        first = build(inp, out, 3)
        got = manifest_by_row(out)
        assert {r: got[r]["status"] for r in (1, 3, 4, 5, 8)} == {
            1: "http_500", 3: "timeout", 4: "connection_error", 5: "http_429", 8: "ok"}
        assert first["ok"] == 5
        assert sizes(out) == shard_sample_counts(out)

        # The server has recovered: a clean build of the same list is the reference.
        build(inp, reference, 3)
        untouched = {k: t for k, t in file_times(out).items() if k.startswith(("00003", "manifest/00003"))}
        assert len(untouched) == 4  # tar, parquet, stats and manifest of shard 3, which has nothing to retry
        before = collections.Counter(server.hits)

        retried = build(inp, out, 3, incremental="retry_failed")
        asked = requests_between(before, collections.Counter(server.hits))

        # Exactly the transient failures were asked for again, once each; 404, 410, not-an-image, ok and duplicate
        # rows were not (row 4's refused connection is retried too, and refused again).
        assert asked == {"/flaky/a": 1, "/late/b": 1, "/flaky/c": 1}
        assert retried["retried"] == {"shards": 2, "rows": 4, "ok": 3}
        assert retried["status_counts"] == {"ok": 7, "http_404": 1, "http_410": 1, "duplicate": 1,
                                            "not_an_image": 1, "connection_error": 1}
        # Row 1 came back, so row 8 (its image) is now the duplicate, as in the clean build.
        assert manifest_by_row(out)[8]["status"] == "duplicate"
        assert manifest_rows(out) == manifest_rows(reference)
        assert tar_members(out) == tar_members(reference)
        assert shard_tables(out) == shard_tables(reference)
        assert sizes(out) == sizes(reference) == shard_sample_counts(out) == {
            "00000.tar": 2, "00001.tar": 2, "00002.tar": 1, "00003.tar": 2}
        assert {k: t for k, t in file_times(out).items() if k in untouched} == untouched
        assert not list(out.rglob(".*.tmp-*"))

        # Only row 4 is left to retry: a further run asks the server for nothing and touches only shard 1.
        times = {k: t for k, t in file_times(out).items() if k != "stats.json"}
        hits = collections.Counter(server.hits)
        again = build(inp, out, 3, incremental="retry_failed")
        assert server.hits == hits
    assert again["retried"] == {"shards": 1, "rows": 1, "ok": 0}
    changed = {k for k, t in file_times(out).items() if k != "stats.json" and times.get(k) != t}
    assert changed <= {"00001.tar", "00001.parquet", "00001_stats.json", "manifest/00001.parquet"}
    assert manifest_rows(out) == manifest_rows(reference)
    assert tar_members(out) == tar_members(reference)


# -- overwrite --------------------------------------------------------------------------------------------------


def test_overwrite_rebuilds_every_shard_and_keeps_other_files(ray_local, tmp_path):
    with ImageServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"row {i}") for i in range(4)]
        rows[2] = (server.url("/flaky/o?fails=1&code=503"), "503 once")
        rows[3] = (server.url("/status/404"), "missing")
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        out = tmp_path / "out"
        first = build(inp, out, 2)
        assert first["status_counts"] == {"ok": 2, "http_503": 1, "http_404": 1}
        (out / "notes.txt").write_text("my own notes\n")
        (out / "extra").mkdir()
        (out / "extra" / "keep.bin").write_bytes(b"\x00\x01")
        time.sleep(0.01)  # mtimes of the rebuilt files differ even on a coarse clock
        before_times = file_times(out)
        before = collections.Counter(server.hits)

        again = build(inp, out, 2, incremental="overwrite")
        asked = requests_between(before, collections.Counter(server.hits))

    # Every row was downloaded again, the 404 included; every shard written anew.
    assert asked == {"/img/40x30.jpg": 2, "/flaky/o": 1, "/status/404": 1}
    assert again["shards_written"] == 2 and again["shards_skipped"] == 0
    assert again["status_counts"] == {"ok": 3, "http_404": 1}
    after = file_times(out)
    for name in ("00000.tar", "00001.tar", "manifest/00000.parquet", "manifest/00001.parquet"):
        assert after[name] != before_times[name], name
    assert (out / "notes.txt").read_text() == "my own notes\n" and (out / "extra" / "keep.bin").read_bytes() == b"\0\1"
    assert sizes(out) == shard_sample_counts(out) == {"00000.tar": 2, "00001.tar": 1}
    assert not list(out.rglob(".*.tmp-*"))


# -- too few successes ------------------------------------------------------------------------------------------


def test_a_build_where_nothing_succeeds_exits_non_zero_with_one_line(ray_local, tmp_path):
    with ImageServer() as server:
        rows = [(server.url("/status/404"), "a"), (server.url("/status/404"), "b"),
                (f"http://127.0.0.1:{free_port()}/x.jpg", "c"), (server.url("/text"), "d")]
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        out = tmp_path / "out"
        spec = tmp_path / "build.yaml"
        spec.write_text(yaml.safe_dump(spec_dict(inp, out, 2)))
        result = CliRunner().invoke(app, ["run", str(spec)])

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in ("ok fraction 0.0000 (0 of 4 rows)", "min_success_fraction", "http_404 2", "connection_error 1",
                   "not_an_image 1", f"{out}/manifest/", f"`clipforge manifest failures {out}`"):
        assert needle in errors[0], (needle, errors[0])
    # The outputs stay: what the message points at is there.
    assert (out / "stats.json").exists() and len(manifest_rows(out)) == 4
    assert sizes(out) == shard_sample_counts(out) == {"00000.tar": 0, "00001.tar": 0}


def test_min_success_fraction_sets_how_many_rows_must_succeed(ray_local, tmp_path):
    with ImageServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"row {i}") for i in range(2)]
        rows += [(server.url("/status/404"), "missing")] * 3 + [(server.url("/status/500"), "broken")]
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        with pytest.raises(TooFewSuccessesError, match=r"ok fraction 0\.3333 \(2 of 6 rows\) - below "
                                                        r"min_success_fraction 0\.5; failed rows: http_404 3, "
                                                        r"http_500 1;"):
            build(inp, tmp_path / "strict", 3, min_success_fraction=0.5)
        assert len(manifest_rows(tmp_path / "strict")) == 6  # kept
        assert build(inp, tmp_path / "third", 3, min_success_fraction=0.3)["ok"] == 2

        failing = [(server.url("/status/404"), "missing")] * 2
        nothing = write_url_list(tmp_path / "nothing.parquet", failing)
        with pytest.raises(TooFewSuccessesError, match="at least one row must succeed"):
            build(nothing, tmp_path / "default", 2)
        assert build(nothing, tmp_path / "accepted", 2, min_success_fraction=0)["ok"] == 0
