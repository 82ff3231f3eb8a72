"""The dashboard over an `s3://` runs folder on a real S3 API (moto_server on loopback).

The same runs are uploaded to a bucket and kept on disk: every column of the S3 listing must equal the local one,
a run that logs more shows up on the next request (no stale object-store listing), and the run page reads the
same curves. Credentials and endpoint come from the environment only, as `clipforge dashboard` gets them.
"""
from __future__ import annotations

import json

import pytest

from clipforge.dashboard.spec import DashboardSpec

from s3_server import new_bucket, s3fs_for, use_s3_from_environment
from test_dashboard_api import make_runs_folder, metric_lines, rows_by_id, serving

# Columns that depend only on file contents (status and times follow upload times on S3).
SAME_COLUMNS = ("name", "dir", "kind", "model", "trainable", "sweep", "swept", "error", "params", "gmacs",
                "samples_seen", "compute", "evals", "step", "epoch", "loss", "samples_per_second")


@pytest.fixture
def aws_env(moto_endpoint, monkeypatch):
    use_s3_from_environment(monkeypatch, moto_endpoint)
    return moto_endpoint


def test_s3_runs_folder_lists_and_reads_what_the_same_local_folder_does(tmp_path, aws_env):
    local = make_runs_folder(tmp_path)
    fs = s3fs_for(aws_env)
    prefix = f"{new_bucket(aws_env)}/team/runs"
    # Object stores have no links: files and folders reached through one stay local only.
    for path in sorted(local.rglob("*")):
        if path.is_file() and not any(p.is_symlink() for p in [path, *path.parents]):
            fs.pipe(f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())

    with serving(local) as on_disk, serving(f"s3://{prefix}") as c:
        local_rows = rows_by_id(on_disk)
        s3_rows = rows_by_id(c)
        assert set(s3_rows) == set(local_rows)
        for run_id, row in s3_rows.items():
            assert {k: row[k] for k in SAME_COLUMNS} == {k: local_rows[run_id][k] for k in SAME_COLUMNS}, run_id
        assert s3_rows["broken"]["status"] == "failed" and s3_rows["alpha"]["status"] == "finished"

        status, s3_run = c.get("/api/run", id="alpha")
        assert status == 200
        assert s3_run["records"] == on_disk.get("/api/run", id="alpha")[1]["records"]
        assert s3_run["skipped_lines"] == 2
        assert c.get("/api/run", id="../outside")[0] == 403

        # The live run logs three more steps: the next listing and run page see them.
        before = s3_rows["live"]["step"]
        lines = metric_lines(6)
        fs.pipe(f"{prefix}/live/metrics.jsonl", ("\n".join(lines) + "\n").encode())
        assert rows_by_id(c)["live"]["step"] == json.loads(lines[-1])["step"] > before
        assert [r["step"] for r in c.get("/api/run", id="live")[1]["records"]][-1] == json.loads(lines[-1])["step"]

        # A new run appears without restarting the dashboard.
        fs.pipe(f"{prefix}/later/metrics.jsonl", ("\n".join(metric_lines(2)) + "\n").encode())
        assert rows_by_id(c)["later"]["step"] == 10


def test_a_scan_keeps_several_requests_in_flight_and_lists_what_one_at_a_time_does(tmp_path):
    import threading
    import time

    from clipforge.dashboard.runs import RunIndex
    from clipforge.dashboard.tree import LocalTree

    local = make_runs_folder(tmp_path)

    class SlowStore(LocalTree):
        """A local folder answering like an object store: every listing and read takes a round trip."""

        def __init__(self, root: str, parallel: int):
            super().__init__(root)
            self.parallel_requests = parallel
            self.in_flight = self.most_in_flight = 0
            self.lock = threading.Lock()

        def _round_trip(self, fn, *args, **kwargs):
            with self.lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                time.sleep(0.02)
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.in_flight -= 1

        def listdir(self, rel, stat=True):
            return self._round_trip(super().listdir, rel, stat)

        def read_bytes(self, rel, start=0, size=-1):
            return self._round_trip(super().read_bytes, rel, start, size)

    spec = DashboardSpec(runs=str(local), port=0, estimate_compute=False, rescan_interval_s=0)
    results = {}
    for parallel in (1, 16):
        tree = SlowStore(str(local), parallel)
        t = time.perf_counter()
        rows, groups = RunIndex(tree, spec).scan(0)
        results[parallel] = (time.perf_counter() - t, tree.most_in_flight, rows, sorted(groups))
    assert results[1][1] == 1 and results[16][1] > 4
    assert results[16][0] < results[1][0] / 2
    drop = ("status", "updated")  # the "live" run's status follows the clock
    assert [{k: v for k, v in r.items() if k not in drop} for r in results[16][2]] == [
        {k: v for k, v in r.items() if k not in drop} for r in results[1][2]]
    assert results[16][3] == results[1][3]
