"""How a dataset build ends: nothing of its own left running, no temporary file left, final counts shown.

Builds run for real against a loopback HTTP server. Those that must be killed, or that must start and
stop a private Ray, run as `clipforge run` in a session of their own with a marker in their
environment; their processes are found by that session and that marker (never by name), and only
those are ever killed.
"""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clipforge.pipeline.build import run_build
from clipforge.pipeline.driver_fence import DriverFence, DriverGone, start_lifeline_actor
from clipforge.pipeline.inputs import UrlList
from clipforge.pipeline.layout import OutputLayout, key_digits
from clipforge.pipeline.sample import SampleSettings
from clipforge.pipeline.shard_task import FETCH_THREAD_PREFIX, build_shard
from clipforge.pipeline.spec import BuildSpec

from build_outputs import manifest_by_row, tar_members, write_url_list
from http_fixtures import ImageServer, _Handler

REPO = Path(__file__).resolve().parents[2]
MARK_VAR = "CLIPFORGE_TEST_BUILD_MARK"
GONE_WITHIN_S = 5.0


# -- a server with slow answers, a gate and large incompressible images --------------------------------


class _LifecycleHandler(_Handler):
    """The fixture routes after `server.delay` seconds; `/gate` waits for `server.gate`;
    `/noise/N.jpg` is a 1024x1024 JPEG of random pixels (about 1.2 MB), the same for the same N."""

    _noise: dict[int, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        time.sleep(srv.delay)
        if self.path.startswith("/gate"):
            with srv.lock:
                srv.hits[self.path.split("?")[0]] += 1
            srv.gate.wait()
            self._send(404)
        elif self.path.startswith("/noise/"):
            seed = int(self.path[len("/noise/"):].split(".")[0])
            self._send(200, self._noise_jpeg(seed), "image/jpeg")
        else:
            super().do_GET()

    @classmethod
    def _noise_jpeg(cls, seed: int) -> bytes:
        if seed not in cls._noise:
            pixels = np.random.default_rng(seed).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=95)
            cls._noise[seed] = out.getvalue()
        return cls._noise[seed]


class LifecycleServer(ImageServer):
    handler = _LifecycleHandler

    def __init__(self, delay: float = 0.0):
        super().__init__(delay=delay)


# -- builds, their processes and their files --------------------------------------------------------------


def spec_dict(inp: Path, out: Path, sps: int, download: dict | None = None, **sections) -> dict:
    raw = {
        "kind": "build",
        "name": "lifecycle-test",
        "input": {"path": str(inp)},
        "output": {"path": str(out), "samples_per_shard": sps},
        "download": {"allow_private_networks": True, "timeout_s": 20.0, "retries": 0, "threads_per_worker": 2,
                     **(download or {})},
        "resize": {"size": 32, "mode": "border"},
        "filters": {"dedup_exact": True},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    }
    raw.update(sections)
    return raw


class CliBuild:
    """`clipforge run SPEC` in a new session, with a marker in its environment and a private Ray."""

    def __init__(self, tmp: Path, raw: dict):
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(raw))
        self.mark = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env[MARK_VAR] = self.mark
        self.log_path = tmp / "build.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "clipforge", "run", str(spec_path)], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def processes(self) -> list[str]:
        """`pid comm` of every live process of this build: in its session, or carrying its marker."""
        needle = f"{MARK_VAR}={self.mark}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if fields[0] == "Z":
                    continue
                ours = int(fields[3]) == self.proc.pid or needle in (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if ours:
                found.append(f"{entry.name} {stat[stat.index('(') + 1:stat.rindex(')')]}")
        return found

    def kill(self, how: str) -> None:
        if how == "group":
            os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and its Ray's daemons; workers have own groups
        else:
            self.proc.send_signal(signal.SIGKILL)  # the driver process alone
        self.proc.wait()

    def close(self) -> None:
        """Whatever the test's outcome: nothing of this build may stay (only its own processes are killed)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for line in self.processes():
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


def wait_until(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def assert_all_gone_within(build: CliBuild, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while build.processes():
        if time.monotonic() > deadline:
            pytest.fail(f"{seconds:.0f} s after the build's driver ended, these of its processes still run: "
                        f"{build.processes()}\n{build.log()}")
        time.sleep(0.1)


def temp_files(out: Path) -> list[str]:
    """Temporary files of unfinished writes (the hidden `.NAME.tmp-*` files) anywhere under `out`."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp-*"))


def committed(out: Path) -> set[str]:
    return {p.name for p in out.glob("[0-9]*.tar")} | {f"manifest/{p.name}" for p in (out / "manifest").glob("*")}


# -- processes ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_finished_build_leaves_no_process_behind(tmp_path):
    """Its private Ray, the workers and the thread still waiting for a straggler's answer all end with it."""
    with LifecycleServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"caption {i}") for i in range(8)]
        rows[3] = (server.url("/gate?row=3"), "never answered")
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        raw = spec_dict(inp, tmp_path / "out", 4, {"straggler": {"max_remaining_fraction": 0.25, "stuck_seconds": 1}})
        build = CliBuild(tmp_path, raw)
        try:
            assert build.proc.wait(timeout=240) == 0, build.log()
            assert_all_gone_within(build, GONE_WITHIN_S)
        finally:
            build.close()
    got = manifest_by_row(tmp_path / "out")
    assert got[3]["status"] == "skipped_straggler" and sum(r["status"] == "ok" for r in got.values()) == 7
    assert temp_files(tmp_path / "out") == []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["process", "group"])
def test_a_killed_driver_leaves_no_process_and_no_later_commit(how, ray_local, tmp_path):
    """SIGKILL of the driver alone or of its process group: every process of the build ends within seconds,
    and no shard becomes visible after the kill; the next run completes the build without a temp file."""
    n_shards, sps = 8, 5
    with LifecycleServer(delay=0.2) as server:
        rows = [(server.url(f"/img/{40 + i % 7}x{30 + i % 5}.jpg?seed={i}"), f"caption {i}")
                for i in range(n_shards * sps)]
        rows[23] = (rows[3][0] + "&copy=1", "same bytes as row 3")
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        out = tmp_path / "out"
        raw = spec_dict(inp, out, sps)
        build = CliBuild(tmp_path, raw)
        try:
            def a_shard_is_done():
                assert build.proc.poll() is None, f"the build exited before it could be killed:\n{build.log()}"
                return list((out / "manifest").glob("*.parquet")) if out.exists() else None

            wait_until(a_shard_is_done, 240, "the first finished shard")
            build.kill(how)
            # A commit already under way when the driver died may still land in these moments...
            time.sleep(0.5)
            visible_after_kill = committed(out)
            assert_all_gone_within(build, GONE_WITHIN_S)
            # ...but orphaned shard tasks must not finish theirs later (they did, for seconds, before).
            time.sleep(1.0)
            assert committed(out) == visible_after_kill
            assert len(visible_after_kill) < 2 * n_shards, "the build finished before it was killed"
        finally:
            build.close()

        stats = run_build(BuildSpec.model_validate(raw), progress=False)
    assert stats["status_counts"] == {"ok": len(rows) - 1, "duplicate": 1}
    assert temp_files(out) == []


_DRIVER = """
import subprocess, sys, time
from clipforge.runtime.local_ray_reaper import LocalRayReaper

reaper = LocalRayReaper()
with reaper.marking():
    # Like a raylet and a worker: the child carries the token; the grandchild, in a session of its own,
    # shows no environment at all (as a process that renamed itself over it may), only its descent.
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "print(subprocess.Popen(['sleep', '120'], env={}, start_new_session=True).pid, "
                              "flush=True); time.sleep(120)"])
print(child.pid, flush=True)
if sys.argv[1] == "exit":
    time.sleep(1.5)  # the watchdog's first looks
    reaper.close()
    print("closed", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_the_reaper_ends_every_process_started_while_marking(end, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), end], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    started = []
    try:
        started = [int(driver.stdout.readline()) for _ in range(2)]
        if end == "exit":
            assert driver.stdout.readline().strip() == "closed"
            assert not [pid for pid in started if _alive(pid)], "closing the reaper left processes running"
        else:
            time.sleep(1.5)  # the watchdog's first looks
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            wait_until(lambda: not any(_alive(pid) for pid in started), GONE_WITHIN_S,
                       "the processes of the killed driver to end")
    finally:
        for pid in started + [driver.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        driver.kill()
        driver.wait()


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


# -- temporary files --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_kill_during_the_dedup_rewrite_leaves_temps_that_the_next_run_removes(ray_local, tmp_path):
    """One shard of large incompressible images and a duplicate: its tar is rewritten after the downloads,
    slowly enough to kill the driver in the middle of that rewrite."""
    with LifecycleServer() as server:
        rows = [(server.url(f"/noise/{i}.jpg"), f"noise {i}") for i in range(40)]
        rows[1] = (server.url("/noise/0.jpg?copy=1"), "same bytes as row 0")
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        out = tmp_path / "out"
        raw = spec_dict(inp, out, len(rows), {"threads_per_worker": 4}, resize={"size": 1024, "mode": "no"})
        build = CliBuild(tmp_path, raw)
        try:
            def rewriting():
                assert build.proc.poll() is None, f"the build exited before its rewrite was seen:\n{build.log()}"
                return (out / "manifest" / "00000.parquet").exists() and list(out.glob(".00000.tar.tmp-*"))

            wait_until(rewriting, 240, "the rewrite of shard 0 after dedup", step=0.002)
            build.kill("group")
            left = temp_files(out)
            assert any(name.startswith(".00000.tar.tmp-") for name in left), left
            assert_all_gone_within(build, GONE_WITHIN_S)
        finally:
            build.close()
        assert manifest_by_row(out)[1]["status"] == "ok"  # the kill came before the rewritten manifest

        stats = run_build(BuildSpec.model_validate(raw), progress=False)
    assert temp_files(out) == []
    assert stats["status_counts"] == {"ok": len(rows) - 1, "duplicate": 1}
    got = manifest_by_row(out)
    assert got[1]["status"] == "duplicate" and got[1]["key"] is None
    assert sorted(tar_members(out)) == sorted(r["key"] for r in got.values() if r["status"] == "ok")


def test_a_resumed_build_removes_the_temp_files_of_every_phase(ray_local, tmp_path):
    """What a run killed while downloading, committing, rewriting or writing stats.json leaves: temporary
    tars, shard tables, shard stats, manifests and stats.json, of finished shards too. Other hidden files stay."""
    with LifecycleServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"caption {i}") for i in range(9)]
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        out = tmp_path / "out"
        spec = BuildSpec.model_validate(spec_dict(inp, out, 3))
        run_build(spec, progress=False)
        before = {p.name: p.read_bytes() for p in out.glob("[0-9]*")}

        layout = OutputLayout(str(out))
        finals = [layout.stats]
        for shard in range(3):
            finals += [layout.tar(shard), layout.parquet(shard), layout.shard_stats(shard), layout.manifest(shard)]
        planted = [Path(layout.temp_for(final)) for final in finals]
        for path in planted:
            path.write_bytes(b"half written")
        keep = [out / ".keep", out / "manifest" / ".keep"]
        for path in keep:
            path.write_bytes(b"not the build's")
        assert len(temp_files(out)) == len(planted)

        stats = run_build(spec, progress=False)
    assert stats["shards_skipped"] == 3
    assert temp_files(out) == []
    assert all(path.exists() for path in keep)
    assert {p.name: p.read_bytes() for p in out.glob("[0-9]*")} == before


def test_a_resumed_build_aborts_the_unfinished_tar_uploads_of_its_s3_output(moto_endpoint):
    from s3_server import new_bucket, s3fs_for, storage_options

    fs = s3fs_for(moto_endpoint)
    bucket = new_bucket(moto_endpoint)
    for key in ("out/00001.tar", "out/00002.tar", "out/notes.bin", "other/00003.tar"):
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    OutputLayout(f"s3://{bucket}/out", storage_options(moto_endpoint)).remove_all_stale_temps()
    left = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert sorted(u["Key"] for u in left) == ["other/00003.tar", "out/notes.bin"]  # not this build's


# -- shard tasks ----------------------------------------------------------------------------------------


def _one_shard(tmp_path: Path, rows: list[tuple[str, str]], **download):
    inp = write_url_list(tmp_path / "urls.parquet", rows)
    spec = BuildSpec.model_validate(spec_dict(inp, tmp_path / "out", len(rows), download))
    OutputLayout(spec.output.path).make_dirs()
    job = next(UrlList(spec.input).iter_shards(spec.output.samples_per_shard))
    settings = SampleSettings(spec.download, spec.resize, spec.filters, spec.output)
    return job, settings, spec.output.path, key_digits(spec.output.samples_per_shard)


def _fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(FETCH_THREAD_PREFIX)]


def test_an_abandoned_straggler_stops_downloading_and_never_holds_the_process(tmp_path):
    with LifecycleServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"c{i}") for i in range(5)]
        rows[2] = (server.url("/gate?row=2"), "never answered")
        job, settings, path, digits = _one_shard(
            tmp_path, rows, timeout_s=1.0, retries=3, retry_backoff_s=0.05,
            straggler={"max_remaining_fraction": 0.2, "stuck_seconds": 0.3})
        summary = build_shard(job, settings, path, digits, [])
        assert summary["status_counts"] == {"ok": 4, "skipped_straggler": 1}
        waiting = _fetch_threads()
        # The thread that waits for row 2 is still there, but cannot keep the interpreter from exiting...
        assert waiting and all(t.daemon for t in waiting)
        # ...and once its read times out it asks for nothing more: 3 retries were allowed.
        wait_until(lambda: not _fetch_threads(), 10, "the abandoned download to end")
        time.sleep(0.3)
        assert server.hits["/gate"] == 1


def test_a_shard_whose_driver_is_gone_is_not_committed(tmp_path):
    ended = subprocess.run(
        [sys.executable, "-c", ("from clipforge.pipeline.driver_fence import DriverFence as F; "
                                "f = F.for_this_process(); print(f.host, f.pid, f.started)")],
        capture_output=True, text=True, check=True).stdout.split()
    gone = DriverFence(ended[0], int(ended[1]), int(ended[2]))
    assert not gone.driver_alive() and DriverFence.for_this_process().driver_alive()
    with LifecycleServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"c{i}") for i in range(4)]
        job, settings, path, digits = _one_shard(tmp_path, rows)
        with pytest.raises(DriverGone, match="shard 0"):
            build_shard(job, settings, path, digits, [], fence=gone)
        out = Path(path)
        assert OutputLayout(path).completed_shards() == set()
        assert committed(out) == set() and temp_files(out) == []

        build_shard(job, settings, path, digits, [], fence=DriverFence.for_this_process())
        assert OutputLayout(path).completed_shards() == {0}


def test_a_task_on_another_host_asks_the_drivers_actor(ray_local):
    import ray

    lifeline = start_lifeline_actor()
    elsewhere = DriverFence("another-host", 1, 1, lifeline)
    assert elsewhere.driver_alive()
    ray.kill(lifeline)  # what Ray does to a driver's actors when the driver ends
    wait_until(lambda: not elsewhere.driver_alive(), 30, "the fence to see the actor gone", step=0.2)


# -- the progress bar --------------------------------------------------------------------------------


def test_the_progress_bar_ends_with_the_counts_after_dedup(ray_local, tmp_path, capfd):
    with LifecycleServer() as server:
        rows = [(server.url(f"/img/40x30.jpg?seed={i}"), f"caption {i}") for i in range(10)]
        rows[4] = (rows[0][0] + "&copy=1", "same bytes as row 0")
        rows[7] = (rows[0][0] + "&copy=2", "same bytes as row 0 again")
        rows[9] = (server.url("/status/404"), "missing")
        inp = write_url_list(tmp_path / "urls.parquet", rows)
        capfd.readouterr()
        stats = run_build(BuildSpec.model_validate(spec_dict(inp, tmp_path / "out", 5)), progress=True)
    bar = capfd.readouterr().err
    shown = [(int(ok), int(failed)) for failed, ok in re.findall(r"failed=(\d+), img_s=[\d.]+, ok=(\d+)", bar)]
    final_ok = sum(r["status"] == "ok" for r in manifest_by_row(tmp_path / "out").values())
    assert final_ok == stats["ok"] == 7
    assert shown and shown[-1] == (7, 3), bar[-500:]  # not the 9 ok the downloads alone gave
