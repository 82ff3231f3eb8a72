"""Reading manifests must leave nothing running that can crash the process at exit.

`pq.read_table` over a Python file object left read-ahead futures that Arrow released on its own threads later;
a process that exited right after (a build job's driver does) then aborted with exit code 134 about one time in
four, after its work had succeeded. Each child below reads manifests and exits at once, as such a driver does.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.pipeline.layout import OutputLayout

RUNS = 12


def test_processes_that_read_manifests_then_exit_exit_cleanly(tmp_path):
    for shard in range(4):
        pq.write_table(pa.table({"key": [f"{shard:05d}{i:04d}" for i in range(50)],
                                 "status": ["ok"] * 50}), tmp_path / f"{shard:05d}.parquet")
    script = textwrap.dedent(f"""\
        import glob
        from clipforge.pipeline.layout import OutputLayout
        layout = OutputLayout({str(tmp_path)!r})
        for path in sorted(glob.glob({str(tmp_path / '*.parquet')!r})) * 10:
            assert layout.read_table(path, ["status"]).num_rows == 50
        """)
    codes = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True) for _ in range(RUNS)]
    crashed = [(c.returncode, c.stderr[-800:]) for c in codes if c.returncode != 0]
    assert not crashed, f"{len(crashed)} of {RUNS} processes crashed at exit; first: {crashed[0]}"


def test_read_table_returns_the_columns_asked_for(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b"], "status": ["ok", "failed_to_download"]}), tmp_path / "m.parquet")
    layout = OutputLayout(str(tmp_path))
    assert layout.read_table(str(tmp_path / "m.parquet")).column_names == ["key", "status"]
    assert layout.read_table(str(tmp_path / "m.parquet"), ["status"]).to_pylist() == [
        {"status": "ok"}, {"status": "failed_to_download"}]
