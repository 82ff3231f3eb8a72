"""Crash safety of the dataset builder: kill -9 mid-run, resume, and compare with an uninterrupted build.

Also the straggler cutoff, which lets a shard finish without its last few hanging rows.
"""
from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from clipforge.pipeline.build import run_build
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.spec import BuildSpec

from build_outputs import manifest_rows, tar_members, write_url_list
from http_fixtures import ImageServer, _Handler

REPO = Path(__file__).resolve().parents[2]


class _GatedHandler(_Handler):
    """The fixture routes, each answered after `server.delay` seconds; `/gate` waits for `server.gate`."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        with srv.lock:
            srv.stamps.append((time.monotonic(), self.path))
        time.sleep(srv.delay)
        if self.path.startswith("/gate"):
            srv.gate.wait()
            self.path = "/img/64x48.jpg?seed=77"
        super().do_GET()


class SlowServer(ImageServer):
    """The fixture routes answered after `delay` seconds, with `/gate` waiting for `gate`."""

    handler = _GatedHandler

    def __init__(self, delay: float = 0.0):
        super().__init__(delay=delay)


def spec_dict(inp: Path, out: Path, sps: int, **download) -> dict:
    return {
        "kind": "build",
        "name": "resume-test",
        "input": {"path": str(inp)},
        "output": {"path": str(out), "samples_per_shard": sps},
        "download": {"allow_private_networks": True, "timeout_s": 20.0, "retries": 0, "threads_per_worker": 2,
                     **download},
        "resize": {"size": 32, "mode": "border"},
        "filters": {"dedup_exact": True},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    }


def session_processes(sid: int) -> list[str]:
    """`pid comm` of every live (non-zombie) process in session `sid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm_end = stat.rindex(")")
        fields = stat[comm_end + 2:].split()
        # fields[0] = state, fields[3] = session id
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(f"{entry.name} {stat[stat.index('(') + 1:comm_end]}")
    return found


def wait_until(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_build(ray_local, tmp_path):
    n_shards, sps = 12, 5
    with SlowServer(delay=0.4) as server:
        rows = [(server.url(f"/img/{40 + i % 7}x{30 + i % 5}.jpg?seed={i}"), f"caption {i}")
                for i in range(n_shards * sps)]
        rows[7] = (server.url("/status/404"), "missing")
        rows[23] = (rows[3][0] + "&copy=1", "same bytes as row 3")  # dedup runs after the resume too
        inp = write_url_list(tmp_path / "urls.parquet", rows)

        reference = tmp_path / "reference"
        run_build(BuildSpec.model_validate(spec_dict(inp, reference, sps)), progress=False)

        out = tmp_path / "killed"
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec_dict(inp, out, sps)))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray, started by the job
        log = (tmp_path / "killed.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "clipforge", "run", str(spec_path)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def first_shard_done():
                if proc.poll() is not None:
                    pytest.fail(f"the build exited ({proc.returncode}) before it could be killed:\n"
                                + (tmp_path / "killed.log").read_text()[-3000:])
                return list((out / "manifest").glob("*.parquet")) if out.exists() else None

            wait_until(first_shard_done, 420, "the first finished shard")
            time.sleep(random.uniform(0.0, 1.5))
            done_at_kill = len(list((out / "manifest").glob("*.parquet")))
            alive = session_processes(proc.pid)
            assert proc.poll() is None, "the build finished before it could be killed"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its private Ray and every Ray worker
            proc.wait()
            log.close()
        assert 0 < done_at_kill < n_shards
        assert any("raylet" in p for p in alive) and any("gcs_server" in p for p in alive), alive
        # Nothing of the killed job may survive (Ray's daemons and workers included).
        wait_until(lambda: not session_processes(proc.pid), 30, "the killed session's processes to exit")

        # Whatever is visible is complete: every tar under its final name reads to the end.
        for path in out.glob("*.tar"):
            with tarfile.open(path) as tar:
                assert all(tar.extractfile(m).read() is not None for m in tar)
        assert OutputLayout(str(out)).completed_shards() <= set(range(n_shards))

        resumed = run_build(BuildSpec.model_validate(spec_dict(inp, out, sps)), progress=False)

    # Shards finished before the kill are not redone (more may have finished between count and kill).
    assert resumed["shards_skipped"] >= done_at_kill
    assert resumed["shards_written"] + resumed["shards_skipped"] == n_shards
    ref_manifest, got_manifest = manifest_rows(reference), manifest_rows(out)
    assert [r["row"] for r in got_manifest] == list(range(len(rows)))  # every row once, none lost
    assert got_manifest == ref_manifest
    assert collections.Counter(r["status"] for r in got_manifest) == {"ok": len(rows) - 2, "http_404": 1,
                                                                     "duplicate": 1}
    assert tar_members(out) == tar_members(reference)
    assert sorted(tar_members(out)) == sorted(r["key"] for r in got_manifest if r["status"] == "ok")
    assert not [p for p in out.rglob(".*.tmp-*")], "temporary files were left behind"


def test_shard_killed_mid_write_leaves_no_visible_tar_and_is_rebuilt(tmp_path):
    with SlowServer() as server:
        rows = [(server.url("/img/400x400.jpg?seed=1"), "big first image"), (server.url("/gate"), "waits")]
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        out = tmp_path / "out"
        raw = spec_dict(inp, out, sps=10)
        raw["resize"] = {"size": 256, "mode": "border"}
        script = tmp_path / "one_shard.py"
        script.write_text(textwrap.dedent(f"""
            from clipforge.runtime.environment import apply_entry_point_defaults
            apply_entry_point_defaults()
            from clipforge.pipeline.build import BuildSpec
            from clipforge.pipeline.inputs import UrlList
            from clipforge.pipeline.layout import OutputLayout, key_digits
            from clipforge.pipeline.sample import SampleSettings
            from clipforge.pipeline.shard_task import build_shard
            spec = BuildSpec.model_validate({raw!r})
            OutputLayout(spec.output.path).make_dirs()
            job = next(UrlList(spec.input).iter_shards(spec.output.samples_per_shard))
            settings = SampleSettings(spec.download, spec.resize, spec.filters, spec.output)
            build_shard(job, settings, spec.output.path, key_digits(spec.output.samples_per_shard), [])
        """))
        proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO)
        try:
            # The first sample is in the temporary tar while the second row's answer is held back.
            partial = wait_until(lambda: [p for p in out.glob(".00000.tar.tmp-*") if p.stat().st_size > 0]
                                 if out.exists() else None, 120, "a partly written shard")
            assert server.hits["/img/64x48.jpg"] == 0 and any(p.startswith("/gate") for _, p in server._server.stamps)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert partial[0].exists()
        assert not (out / "00000.tar").exists() and not list((out / "manifest").glob("*"))
        assert OutputLayout(str(out)).completed_shards() == set()

        server.gate.set()
        stats = run_build(BuildSpec.model_validate(raw), progress=False)
    assert stats["status_counts"] == {"ok": 2} and stats["shards_written"] == 1
    assert len(tar_members(out)) == 2
    assert not [p for p in out.rglob(".*.tmp-*")], "the killed attempt's temporary tar was not cleaned up"


def test_straggler_cutoff_finishes_shards_without_their_hanging_rows(ray_local, tmp_path):
    with SlowServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"c{i}") for i in range(10)]
        rows[4] = (server.url("/gate?row=4"), "hangs")
        rows[8] = (server.url("/gate?row=8"), "hangs too")
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        raw = spec_dict(inp, tmp_path / "out", sps=5,
                        straggler={"max_remaining_fraction": 0.2, "stuck_seconds": 1.5})
        t0 = time.monotonic()
        stats = run_build(BuildSpec.model_validate(raw), progress=False)
        elapsed = time.monotonic() - t0
        gated_requests = sum(p.startswith("/gate") for _, p in server._server.stamps)
        server.gate.set()

    got = {r["row"]: r for r in manifest_rows(tmp_path / "out")}
    assert gated_requests == 2  # both were asked for, neither answered
    assert {r: got[r]["status"] for r in (4, 8)} == {4: "skipped_straggler", 8: "skipped_straggler"}
    assert "no answer after" in got[4]["error"] and got[4]["key"] is None
    assert stats["status_counts"] == {"ok": 8, "skipped_straggler": 2}
    assert elapsed < 20, elapsed  # the rows' own download timeout is 20 s
    assert sorted(tar_members(tmp_path / "out")) == sorted(got[r]["key"] for r in got if r not in (4, 8))


def test_straggler_cutoff_never_drops_more_than_its_fraction(ray_local, tmp_path):
    """Two hanging rows in a shard of 5 with a 20 % allowance: the shard waits for their real outcome."""
    with SlowServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"c{i}") for i in range(5)]
        rows[1] = (server.url("/gate?row=1"), "hangs")
        rows[2] = (server.url("/gate?row=2"), "hangs")
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        raw = spec_dict(inp, tmp_path / "out", sps=5, timeout_s=3.0,
                        straggler={"max_remaining_fraction": 0.2, "stuck_seconds": 0.5})
        stats = run_build(BuildSpec.model_validate(raw), progress=False)
        server.gate.set()
    assert stats["status_counts"] == {"ok": 3, "timeout": 2}
