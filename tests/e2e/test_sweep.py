"""`kind: sweep`: expansion into children, validation naming the line and child, running them locally
(in-process and as Ray tasks) with failures recorded and resume, and submitting them to a real Ray head.

The children are real `kind: build` jobs (the cheapest job that makes a run directory) downloading three
images from a loopback HTTP server.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipforge.cli import app
from clipforge.cluster.specs import SpecError, load_spec
from clipforge.cluster.sweep_children import child_names, expand_children
from clipforge.dashboard.sweeps import child_values, swept_fields

from http_fixtures import ImageServer
from ray_cluster import cli, failed_job_logs
from spec_fixtures import TRAIN_YAML

TRAIN_BASE = TRAIN_YAML  # its storage is replaced by each child's run directory

GRID = """\
kind: sweep
name: lrbs
storage: {storage}
base: base.yaml
grid:
  optim.lr: [0.1, 0.01]
  data.batch_size: [8, 16]
"""

BUILD_BASE = """\
kind: build
input: {{path: {urls}}}
output: {{path: unused, samples_per_shard: 10}}
download: {{allow_private_networks: true, timeout_s: 10, retries: 0, threads_per_worker: 4}}
resize: {{size: 32}}
scaling: {{workers: 1, cpus_per_worker: 0.5}}
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def grid_sweep(tmp_path: Path, grid: str = GRID, base: str = TRAIN_BASE) -> Path:
    write(tmp_path, "base.yaml", base)
    return write(tmp_path, "sweep.yaml", grid.format(storage=tmp_path / "out"))


# ---------------------------------------------------------------- expansion and validation (no Ray)


def test_grid_children_in_product_order_with_their_own_run_dirs(tmp_path):
    spec = load_spec(grid_sweep(tmp_path))
    children = expand_children(spec)
    assert [c.dir for c in children] == ["lr0.1-bs8", "lr0.1-bs16", "lr0.01-bs8", "lr0.01-bs16"]
    assert [(c.spec.optim.lr, c.spec.data.batch_size) for c in children] == [(0.1, 8), (0.1, 16), (0.01, 8),
                                                                            (0.01, 16)]
    for c in children:
        assert c.spec.kind == "train" and c.spec.name == f"lrbs-{c.dir}"
        assert c.spec.storage == str(tmp_path / "out" / c.dir) == c.run_dir
        assert c.spec.model.name == "tiny" and c.spec.scaling.workers == 2  # the rest is the base's
    assert children[1].values == {"optim.lr": 0.1, "data.batch_size": 16}
    assert spec.base == str(tmp_path / "base.yaml")  # relative to the sweep file, not to the working dir


def test_list_children_dotted_and_indexed_paths_and_common_overrides(tmp_path):
    base = TRAIN_BASE + "eval_tasks:\n  - {task: retrieval, dataset: a, shards: [/tmp/e]}\n"
    sweep = """\
kind: sweep
storage: out
base: base.yaml
overrides: {{optim.epochs: 2, scaling.cpus_per_worker: 0.5}}
list:
  - {{}}
  - {{eval_tasks.0.dataset: b, model.trainable: heads}}
  - {{optim: {{lr: 0.5, warmup_steps: 0}}}}
"""
    spec = load_spec(grid_sweep(tmp_path, sweep, base))
    first, second, third = expand_children(spec)
    assert [first.dir, second.dir, third.dir] == ["base", "dataset_b-trainable_heads",
                                                  "optim_lr_0.5_warmup_steps_0"]
    assert second.spec.eval_tasks[0].dataset == "b" and second.spec.model.trainable == "heads"
    assert first.spec.eval_tasks[0].dataset == "a" and first.spec.model.trainable == "all"
    assert (third.spec.optim.lr, third.spec.optim.warmup_steps) == (0.5, 0)
    assert all(c.spec.scaling.cpus_per_worker == 0.5 for c in (first, second, third))
    # A mapping value replaces its whole section, as on the command line: `optim.epochs: 2` is gone there.
    assert (first.spec.optim.epochs, second.spec.optim.epochs, third.spec.optim.epochs) == (2, 2, 1)
    assert spec.axes() == {"eval_tasks.0.dataset": ["b"], "model.trainable": ["heads"],
                           "optim": [{"lr": 0.5, "warmup_steps": 0}]}


def test_child_names_are_short_safe_and_unique():
    names = child_names([{"input.path": "a/b"}, {"input.path": "a_b"}, {"input.path": "x" * 200},
                         {"optim.lr": 1e-5, "head.lr": True}])
    assert len(set(names)) == 4
    assert names[0].startswith("path_a_b-") and names[1].startswith("path_a_b-")  # told apart by a hash
    assert len(names[2]) <= 60
    assert names[3] == "optim_lr1e-05-head_lr_true"  # two fields named `lr`: longer names
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+-_") for n in names)


def test_an_invalid_value_names_the_axis_line_and_the_children(tmp_path):
    path = grid_sweep(tmp_path, GRID.replace("[0.1, 0.01]", "[0.1, -1]"))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == (f"{path}:6: children lr-1-bs8, lr-1-bs16: field `optim.lr`: Input should be greater "
                            "than 0 (got -1)")


def test_a_check_across_fields_names_the_swept_one_and_the_child(tmp_path):
    path = grid_sweep(tmp_path, GRID.replace("[8, 16]", "[8, 7]"))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    lines = str(e.value).splitlines()
    assert lines == [f"{path}:7: children lr0.1-bs7, lr0.01-bs7: field `(top level)`: data.batch_size (7) must be "
                     "divisible by scaling.workers (2)"]


def test_a_problem_of_the_base_names_the_base_file_once(tmp_path):
    path = grid_sweep(tmp_path, base=TRAIN_BASE.replace("  lr: 0.001", "  lr: 0.001\n  beta1: 2"))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == (f"{tmp_path / 'base.yaml'}:11: every child (4): field `optim.beta1`: Input should be "
                            "less than 1 (got 2)")


def test_an_unknown_swept_field_names_the_axis(tmp_path):
    path = grid_sweep(tmp_path, GRID.replace("optim.lr:", "optim.lrr:"))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == f"{path}:6: every child (4): field `optim.lrr`: unknown field (not part of this spec; " \
                           "check the spelling)"


def test_schema_of_a_sweep():
    r = cli("schema", "sweep")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert {"base", "grid", "list", "overrides", "max_concurrent", "storage"} <= set(schema["properties"])
    assert schema["properties"]["max_concurrent"]["minimum"] == 1


# ---------------------------------------------------------------- running locally


@pytest.fixture
def image_server():
    with ImageServer() as server:
        yield server


def url_list(server: ImageServer, path: Path) -> Path:
    rows = "".join(f"{server.url(f'/img/{40 + i}x30.jpg')},picture {i}\n" for i in range(3))
    path.write_text("url,caption\n" + rows)
    return path


def image_hits(server: ImageServer) -> int:
    return sum(n for p, n in server.hits.items() if p.startswith("/img/"))


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def read_sweep(storage: Path) -> dict:
    return json.loads((storage / "sweep.json").read_text())


@pytest.mark.usefixtures("ray_local")
def test_a_failed_child_does_not_stop_the_others_and_the_sweep_resumes(tmp_path, image_server):
    urls = url_list(image_server, tmp_path / "urls.csv")
    write(tmp_path, "base.yaml", BUILD_BASE.format(urls=urls))
    missing = tmp_path / "later.csv"
    out = tmp_path / "out"
    sweep = write(tmp_path, "sweep.yaml", f"""\
kind: sweep
name: sizes
storage: {out}
base: base.yaml
list:
  - {{resize.size: 16}}
  - {{resize.size: 24, input.path: {missing}}}
  - {{resize.size: 32, output.samples_per_shard: 2}}
""")
    good, bad, last = (c.dir for c in expand_children(load_spec(sweep)))

    r = run_cli("run", str(sweep))
    assert r.exit_code == 1, r.output
    assert f"1 of 3 children did not finish ({bad})" in r.output and "Traceback" not in r.output
    record = read_sweep(out)
    assert [(c["dir"], c["status"]) for c in record["children"]] == [(good, "finished"), (bad, "failed"),
                                                                      (last, "finished")]
    assert "later.csv` does not exist" in record["children"][1]["error"]
    assert json.loads((out / bad / "error.json").read_text())["message"] == record["children"][1]["error"]
    assert image_hits(image_server) == 6  # the two good children downloaded their three images each
    assert len(list((out / last).glob("*.tar"))) == 2  # its own samples_per_shard
    # What the dashboard reads: the swept fields and each child's values.
    assert swept_fields(record) == ["resize.size", "input.path", "output.samples_per_shard"]
    assert child_values(record) == {good: {"resize.size": 16}, bad: {"resize.size": 24, "input.path": str(missing)},
                                    last: {"resize.size": 32, "output.samples_per_shard": 2}}

    # Resume: the failed child runs again (now that its input exists), the finished ones are skipped.
    url_list(image_server, missing)
    stats_mtime = (out / good / "stats.json").stat().st_mtime_ns
    r = run_cli("run", str(sweep))
    assert r.exit_code == 0, r.output
    assert [c["status"] for c in read_sweep(out)["children"]] == ["finished"] * 3
    assert image_hits(image_server) == 9
    assert (out / good / "stats.json").stat().st_mtime_ns == stats_mtime
    assert not (out / bad / "error.json").exists()

    # A child recorded as finished whose run directory has lost its end-of-build file runs again (its
    # shards are complete, so the build itself skips them and only writes stats.json again).
    (out / last / "stats.json").unlink()
    r = run_cli("run", str(sweep))
    assert r.exit_code == 0, r.output
    assert (out / last / "stats.json").is_file()
    assert (out / good / "stats.json").stat().st_mtime_ns == stats_mtime


@pytest.mark.usefixtures("ray_local")
def test_children_run_as_ray_tasks_when_several_may_run_at_once(tmp_path, image_server):
    urls = url_list(image_server, tmp_path / "urls.csv")
    write(tmp_path, "base.yaml", BUILD_BASE.format(urls=urls))
    out = tmp_path / "out"
    sweep = write(tmp_path, "sweep.yaml", f"""\
kind: sweep
storage: {out}
base: base.yaml
max_concurrent: 2
grid:
  resize.size: [16, 24]
  output.samples_per_shard: [2, 10]
""")
    r = run_cli("run", str(sweep))
    assert r.exit_code == 0, r.output
    record = read_sweep(out)
    assert record["max_concurrent"] == 2 and record["fields"] == {"resize.size": [16, 24],
                                                                 "output.samples_per_shard": [2, 10]}
    assert [(c["dir"], c["status"]) for c in record["children"]] == [
        ("size16-sps2", "finished"), ("size16-sps10", "finished"), ("size24-sps2", "finished"),
        ("size24-sps10", "finished")]
    assert image_hits(image_server) == 12
    for c in record["children"]:
        shards = sorted((out / c["dir"]).glob("*.tar"))
        assert len(shards) == (2 if c["values"]["output.samples_per_shard"] == 2 else 1)


# ---------------------------------------------------------------- submitted to a real Ray head


def _most_at_once(intervals: list[tuple[int, int]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
def test_submit_a_2x2_sweep_records_four_finished_runs(ray_head, tmp_path, image_server):
    from clipforge.cluster.submit import connect, list_jobs

    urls = url_list(image_server, tmp_path / "urls.csv")
    write(tmp_path, "base.yaml", BUILD_BASE.format(urls=urls))
    out = tmp_path / "out"
    sweep = write(tmp_path, "sweep.yaml", f"""\
kind: sweep
name: sub
storage: {out}
base: base.yaml
max_concurrent: 2
grid:
  resize.size: [16, 24]
  output.samples_per_shard: [2, 10]
""")
    t0 = time.time() * 1000
    r = cli("submit", str(sweep), "--address", ray_head)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + failed_job_logs(ray_head)
    record = read_sweep(out)
    assert record["mode"] == "submit" and record["address"] == ray_head
    assert [c["status"] for c in record["children"]] == ["finished"] * 4
    assert all((out / c["dir"] / "stats.json").is_file() for c in record["children"])
    assert image_hits(image_server) == 12
    assert json.loads(r.stdout)["children"] == {c["dir"]: "finished" for c in record["children"]}

    # Four jobs on the cluster, one per child, never more than two at once.
    ids = {c["job_id"] for c in record["children"]}
    jobs = [j for j in list_jobs(connect(ray_head)) if j.submission_id in ids]
    assert len(jobs) == 4 and all(j.status.value == "SUCCEEDED" for j in jobs)
    assert {j.metadata["clipforge.name"] for j in jobs} == {f"sub-{c['dir']}" for c in record["children"]}
    assert all(j.start_time >= t0 for j in jobs)
    assert _most_at_once([(j.start_time, j.end_time) for j in jobs]) <= 2

    # Submitting it again submits nothing: every child is finished.
    r = cli("submit", str(sweep), "--address", ray_head)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("finished in an earlier run; skipped") == 4
    assert len([j for j in list_jobs(connect(ray_head)) if j.start_time >= t0]) == 4
