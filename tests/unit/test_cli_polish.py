"""The command line a new user meets: --version, help in plain words, the dashboard's warning when it serves other
machines, `render kuberay`'s warnings about local paths, and `run --dry-run` / `validate --check`, which check a
spec's paths and plan without starting Ray or writing anything."""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import selectors
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def clipforge(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd or REPO, env=env)


def write_shard(path: Path, samples: int, incomplete: int = 0) -> Path:
    """A WebDataset tar shard: `samples` image+caption pairs, then `incomplete` samples with no caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(samples + incomplete):
            caption = [("txt", b"a caption")] if i < samples else []
            members = [("jpg", b"\xff\xd8 not decoded when counting"), *caption]
            for ext, data in members:
                info = tarfile.TarInfo(f"{path.stem}_{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def train_spec(storage: str, shards: list[str], **over) -> dict:
    spec = {"kind": "train", "name": "t", "storage": storage, "model": {"name": "tiny"},
            "data": {"shards": shards, "batch_size": 4}, "scaling": {"workers": 2}}
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            spec.setdefault(section, {})[name] = value
        else:
            spec[key] = value
    return spec


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- --version and --help ---------------------------------------------------------------------------------------


def test_version_prints_the_installed_package_version():
    r = clipforge("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"clipforge {importlib.metadata.version('clipforge')}"


def _every_command(group, path=()):
    """(command path, click command) of every command and group below `group`."""
    yield path, group
    for name, command in getattr(group, "commands", {}).items():
        yield from _every_command(command, path + (name,))


def test_help_shows_plain_words_instead_of_type_tags():
    import typer.main
    from typer.testing import CliRunner

    from clipforge.cli import app

    runner = CliRunner()
    paths = [p for p, _ in _every_command(typer.main.get_command(app))]
    assert ("run",) in paths and ("render", "kuberay") in paths and ("cluster", "up") in paths
    for path in paths:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (path, r.output)
        tags = re.findall(r"<[a-z][a-z_\[\], |]*>", r.output)
        assert not tags, f"`clipforge {' '.join(path)} --help` shows {tags}"
    run_help = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "run [OPTIONS] SPEC [OVERRIDES]..." in run_help
    assert re.search(r"SPEC\s+PATH\s+Spec YAML file", run_help)
    assert re.search(r"OVERRIDES\.\.\.\s+TEXT\s+field=value", run_help)
    dashboard_help = runner.invoke(app, ["dashboard", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--port\s+N\s+TCP port", dashboard_help)
    assert re.search(r"--no-try\s+Disable", dashboard_help)  # a flag takes no value: nothing between


def test_usage_mistakes_are_usage_errors_not_internal_ones():
    r = clipforge("run")
    assert r.returncode == 2 and "Missing argument 'SPEC'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = clipforge("dashboard", "--runs", str(REPO), "--port", "eighty")
    assert r.returncode == 2 and "'--port'" in r.stderr and "internal error" not in r.stderr, r.stderr


# -- dashboard --host -------------------------------------------------------------------------------------------


def _dashboard_stderr(runs: Path, host: str) -> str:
    """What `clipforge dashboard` prints on stderr up to serving (it is stopped once it serves)."""
    proc = subprocess.Popen([sys.executable, "-m", "clipforge", "dashboard", "--runs", str(runs), "--host", host,
                             "--port", "0", "--no-compute-estimates"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=60), "the dashboard did not start serving within 60 s"
        served = proc.stdout.readline()
        assert "clipforge dashboard for" in served, served
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    return err


def test_dashboard_on_a_public_address_warns_and_says_how_to_stay_local(tmp_path):
    err = _dashboard_stderr(tmp_path, "0.0.0.0")
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, err
    assert "--host 0.0.0.0" in warning[0] and "anyone who can reach this machine" in warning[0]
    assert "'try it' page" in warning[0] and "upload" in warning[0]
    assert "ssh -N -L" in warning[0] and "127.0.0.1" in warning[0]
    assert "warning" not in _dashboard_stderr(tmp_path, "127.0.0.1")


def test_exposure_warning_names_the_try_page_only_when_it_is_served():
    from clipforge.dashboard.server import exposure_warning

    for host in ("127.0.0.1", "127.0.0.5", "localhost", "::1"):
        assert exposure_warning(host, 8050, try_page=True) is None
    assert "'try it'" not in exposure_warning("10.1.2.3", 8050, try_page=False)
    assert "ssh -N -L 8050:127.0.0.1:8050" in exposure_warning("::", 8050, try_page=True)


# -- render kuberay ---------------------------------------------------------------------------------------------


def test_render_kuberay_warns_about_each_local_path(tmp_path):
    spec = train_spec("/data/runs/t", ["/data/shards", "s3://bucket/more/*.tar"],
                      model={"name": "tiny", "checkpoint": "s3://bucket/ckpt"})
    spec["eval_tasks"] = [{"task": "zeroshot_classification", "dataset": "d", "image_folder": "/data/eval/d"}]
    r = clipforge("render", "kuberay", str(write_spec(tmp_path / "t.yaml", spec)))
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["kind"] == "RayJob"
    warnings = r.stderr.splitlines()
    assert [re.search(r"field `([^`]+)`", w).group(1) for w in warnings] == [
        "data.shards.0", "eval_tasks.0.image_folder", "storage"]
    assert all(w.startswith("warning:") and "3 pods" in w and "s3://" in w for w in warnings)
    remote = train_spec("s3://bucket/runs/t", ["s3://bucket/shards"])
    r = clipforge("render", "kuberay", str(write_spec(tmp_path / "remote.yaml", remote)))
    assert r.returncode == 0 and r.stderr == ""


# -- run --dry-run / validate --check ---------------------------------------------------------------------------


def test_dry_run_of_a_train_spec_prints_paths_and_the_plan_and_starts_nothing(tmp_path):
    shards = tmp_path / "shards"
    for i, n in enumerate([9, 7, 6]):
        write_shard(shards / f"{i:05d}.tar", n, incomplete=1)  # incomplete samples do not count
    (shards / "sizes.json").write_text(json.dumps({"00000.tar": 9}))  # the others are counted
    write_spec(tmp_path / "t.yaml", train_spec("run", ["shards"], optim__epochs=3))
    before = files_under(tmp_path)
    probe = ("import sys\nfrom clipforge.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    print('EXIT', e.code)\nprint('RAY_IMPORTED', 'ray' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", probe, "run", "--dry-run", "t.yaml"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert "EXIT 0" in r.stdout and "RAY_IMPORTED False" in r.stdout, r.stdout + r.stderr
    assert files_under(tmp_path) == before  # no run folder, no marker, nothing else
    assert f"data.shards.0: {shards}: 3 shards" in r.stdout
    assert f"storage: {tmp_path / 'run'}: does not exist yet" in r.stdout
    # 22 samples over 2 workers: whole shards would give ranks 9 and 13 (< 90% use), so every rank takes every
    # 2nd sample: 11 each, local batch 2 -> 5 steps per epoch; 3 epochs -> 15 steps of 4 samples.
    assert "3 shards, 22 samples (1 from sizes.json, 2 counted)" in r.stdout
    assert "5 steps per epoch; optim.epochs 3: 15 steps, 60 samples" in r.stdout
    assert "\nok: no problems found\nEXIT 0" in r.stdout


def test_dry_run_reports_every_missing_input_on_its_own_line(tmp_path):
    write_shard(tmp_path / "shards" / "00000.tar", 4)
    spec = train_spec(str(tmp_path / "run"), [str(tmp_path / "shards"), str(tmp_path / "gone")],
                      model={"name": "tiny", "checkpoint": str(tmp_path / "no-ckpt")})
    path = write_spec(tmp_path / "t.yaml", spec)
    for command in (["run", "--dry-run"], ["validate", "--check"]):
        r = clipforge(*command, str(path))
        assert r.returncode == 1, r.stderr
        errors = r.stderr.strip().splitlines()
        assert len(errors) == 2 and errors[0].startswith("error: "), r.stderr
        assert "`data.shards.1`" in errors[0] and str(tmp_path / "gone") in errors[0] and "does not exist" in errors[0]
        assert "`model.checkpoint`" in errors[1] and str(tmp_path / "no-ckpt") in errors[1]
        assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_dry_run_refuses_data_that_fills_no_step(tmp_path):
    write_shard(tmp_path / "shards" / "00000.tar", 3)
    spec = write_spec(tmp_path / "t.yaml", train_spec(str(tmp_path / "run"), [str(tmp_path / "shards")]))
    r = clipforge("run", "--dry-run", str(spec), "data.batch_size=8")
    assert r.returncode == 1
    assert "field `data.shards`: 3 samples in 1 shard fill no step" in r.stderr and "data.batch_size 8" in r.stderr


def test_dry_run_of_a_sweep_lists_its_children_and_their_plans(tmp_path):
    write_shard(tmp_path / "shards" / "00000.tar", 8)
    write_spec(tmp_path / "base.yaml", train_spec("unused", [str(tmp_path / "shards")]))
    sweep = {"kind": "sweep", "name": "sw", "storage": str(tmp_path / "sweep"), "base": "base.yaml",
             "grid": {"data.batch_size": [2, 4]}}
    r = clipforge("run", "--dry-run", str(write_spec(tmp_path / "sweep.yaml", sweep)))
    assert r.returncode == 0, r.stderr
    assert "2 children, at most 1 at once" in r.stdout
    assert f"bs2 (data.batch_size=2) -> {tmp_path / 'sweep' / 'bs2'}" in r.stdout
    assert re.search(r"plan bs2: .*4 steps per epoch", r.stdout) and re.search(r"plan bs4: .*2 steps per", r.stdout)
    assert not (tmp_path / "sweep").exists()


def test_dry_run_of_a_build_checks_the_url_list_columns(tmp_path):
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://example.com/a.jpg,a dog\n")
    spec = {"kind": "build", "input": {"path": str(tmp_path / "urls.csv"), "caption_col": "text"},
            "output": {"path": str(tmp_path / "out")}}
    path = write_spec(tmp_path / "b.yaml", spec)
    r = clipforge("run", "--dry-run", str(path))
    assert r.returncode == 1 and "column `text` (input.caption_col) not found" in r.stderr
    r = clipforge("run", "--dry-run", str(path), "input.caption_col=caption")
    assert r.returncode == 0, r.stderr
    assert "input.path" in r.stdout and "1 URL list file" in r.stdout and not (tmp_path / "out").exists()


def test_dry_run_reads_s3_with_the_environment_credentials_and_names_a_missing_path(tmp_path, moto_endpoint,
                                                                                     monkeypatch):
    from s3_server import new_bucket, s3fs_for, use_s3_from_environment

    use_s3_from_environment(monkeypatch, moto_endpoint)
    bucket = new_bucket(moto_endpoint)
    s3 = s3fs_for(moto_endpoint)
    s3.put(str(write_shard(tmp_path / "00000.tar", 5)), f"{bucket}/shards/00000.tar")
    s3.pipe(f"{bucket}/shards/sizes.json", b'{"00000.tar": 5}')
    spec = train_spec(f"s3://{bucket}/runs/t", [f"s3://{bucket}/shards", f"s3://{bucket}/missing/*.tar"])
    path = write_spec(tmp_path / "t.yaml", spec)
    r = clipforge("run", "--dry-run", str(path), env=dict(os.environ))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("error:") == 1 and "`data.shards.1`" in r.stderr
    assert f"s3://{bucket}/missing/*.tar" in r.stderr and "matches no files" in r.stderr
    assert f"data.shards.0: s3://{bucket}/shards: 1 shard" in r.stdout
    r = clipforge("run", "--dry-run", str(path), f"data.shards=[s3://{bucket}/shards]", env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "1 shard, 5 samples (1 from sizes.json, 0 counted)" in r.stdout
    assert not s3.exists(f"{bucket}/runs")


def test_dry_run_of_an_eval_spec_checks_every_task_source(tmp_path):
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "labels.idx").write_bytes(b"\x00")
    spec = {"kind": "eval", "storage": str(tmp_path / "results"), "model": {"name": "tiny"}, "tasks": [
        {"task": "retrieval", "dataset": "r", "table": str(tmp_path / "no-table.csv")},
        {"task": "zeroshot_classification", "dataset": "z", "image_folder": str(tmp_path / "classes")},
        {"task": "linear_probe", "dataset": "p", "train": {"path": str(tmp_path / "classes")},
         "test": {"images": str(tmp_path / "no-images.idx"), "labels": str(tmp_path / "labels.idx")}}]}
    r = clipforge("validate", "--check", str(write_spec(tmp_path / "e.yaml", spec)))
    assert r.returncode == 1
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2 and "`tasks.0.table`" in errors[0] and "`tasks.2.test.images`" in errors[1], r.stderr
    assert f"tasks.1.image_folder: {tmp_path / 'classes'}: folder" in r.stdout
    assert f"tasks.2.test.labels: {tmp_path / 'labels.idx'}: file" in r.stdout
    assert f"storage: {tmp_path / 'results'}: does not exist yet" in r.stdout


def test_dry_run_says_what_the_output_folder_holds(tmp_path):
    write_shard(tmp_path / "shards" / "00000.tar", 4)
    spec = write_spec(tmp_path / "t.yaml", train_spec(str(tmp_path / "run"), [str(tmp_path / "shards")]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    r = clipforge("run", "--dry-run", str(spec))
    assert r.returncode == 0 and "holds 1 file or folder: the job writes there only if" in r.stdout, r.stderr
    (tmp_path / "run" / ".clipforge-output").write_text(json.dumps({"kind": "train", "name": "t"}))
    assert "holds this train job's earlier output" in clipforge("run", "--dry-run", str(spec)).stdout
    assert "holds the output of `train` job `t`" in clipforge("run", "--dry-run", str(spec), "name=u").stdout


def test_dry_run_names_a_broken_sizes_file(tmp_path):
    write_shard(tmp_path / "shards" / "00000.tar", 4)
    (tmp_path / "shards" / "sizes.json").write_text("{not json")
    spec = write_spec(tmp_path / "t.yaml", train_spec(str(tmp_path / "run"), [str(tmp_path / "shards")]))
    r = clipforge("run", "--dry-run", str(spec))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path / 'shards' / 'sizes.json'}: expected a JSON mapping" in r.stderr
