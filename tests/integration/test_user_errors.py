"""Bad input at run time, through the real command line in fresh processes: every failure a user can cause ends in
one `error:` line that names the field (or file, or option), with the documented exit code and no traceback, and
nothing the user had is changed.

Covered: object-store paths without credentials or without a reachable endpoint (named by field, under 30 s),
output folders that are empty paths, the current folder, or hold someone else's files (refused, folder unchanged),
a re-run of the same job (accepted), `overwrite: true` (accepted), shard globs that match nothing, unreadable eval
tables, and every other command's typical bad options.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3_server import KEY_ID, REGION, SECRET, free_port, new_bucket, s3fs_for

REPO = Path(__file__).resolve().parents[2]
STORAGE_DEADLINE_S = 30.0
EXIT_FAILED, EXIT_INVALID, EXIT_INTERNAL = 1, 2, 70


def base_env() -> dict:
    """The environment without any AWS setting (each test adds what it means), and no instance-metadata lookups."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("RAY_ADDRESS",)}
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION=REGION)
    return env


def clipforge(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "clipforge", *args], capture_output=True, text=True,
                       env=env or base_env(), cwd=cwd or REPO, timeout=timeout)
    return r, time.monotonic() - t0


def one_error_line(r, code: int, *needles: str) -> str:
    """Assert the run failed with `code`, printed exactly one `error:` line holding every needle, and no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-4000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> SHA-256 of its bytes), to prove nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def build_spec(input_path: str, output_path: str, extra: str = "") -> str:
    return (f"kind: build\nname: b\ninput: {{path: '{input_path}'}}\noutput: {{path: '{output_path}'{extra}}}\n"
            "download: {allow_networks: [127.0.0.0/8], timeout_s: 2, retries: 0}\n"
            "scaling: {workers: 1, cpus_per_worker: 0.5}\n")


def train_spec(shards: str, storage: str, extra: str = "") -> str:
    return (f"kind: train\nname: t\nstorage: '{storage}'\nmodel: {{name: tiny}}\n"
            f"data: {{shards: ['{shards}'], batch_size: 4}}\nscaling: {{workers: 1}}\n{extra}")


def eval_spec(table: str, storage: str) -> str:
    return (f"kind: eval\nname: e\nstorage: '{storage}'\nmodel: {{name: tiny}}\n"
            f"tasks:\n  - {{task: retrieval, dataset: d, table: '{table}'}}\n")


# -- object stores: no credentials, no endpoint ------------------------------------------------------------------

def _no_credentials_env(endpoint: str) -> dict:
    return {**base_env(), "AWS_ENDPOINT_URL": endpoint}


def _unreachable_env() -> dict:
    return {**base_env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET}


@pytest.mark.parametrize("kind, field", [("build", "input.path"), ("train", "data.shards"), ("eval", "tasks.0")])
def test_s3_without_credentials_names_the_field(tmp_path, moto_endpoint, kind, field):
    bucket = new_bucket(moto_endpoint)
    s3fs_for(moto_endpoint).pipe_file(f"{bucket}/in/x", b"x")
    text = {"build": build_spec(f"s3://{bucket}/in/urls.parquet", str(tmp_path / "out")),
            "train": train_spec(f"s3://{bucket}/in/*.tar", str(tmp_path / "run")),
            "eval": eval_spec(f"s3://{bucket}/in/table.csv", str(tmp_path / "out"))}[kind]
    r, seconds = clipforge("run", str(write_spec(tmp_path / "spec.yaml", text)),
                           env=_no_credentials_env(moto_endpoint))
    one_error_line(r, EXIT_FAILED, f"field `{field}`", f"s3://{bucket}/in/", "no credentials")
    assert seconds < STORAGE_DEADLINE_S
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, field", [("build", "output.path"), ("train", "storage"), ("eval", "storage")])
def test_s3_output_without_reachable_endpoint_names_the_field(tmp_path, kind, field):
    # Inputs are local and valid, so the first object-store call is on the output folder.
    text = _spec_for(kind, _inputs(tmp_path), "s3://bucket/out")
    r, seconds = clipforge("run", str(write_spec(tmp_path / "spec.yaml", text)), env=_unreachable_env())
    one_error_line(r, EXIT_FAILED, f"field `{field}`", "s3://bucket/out", "cannot reach the object store")
    assert seconds < STORAGE_DEADLINE_S


# -- output folders ----------------------------------------------------------------------------------------------

def _occupied(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    (folder / "stats.json").write_text('{"mine": true}\n')  # the file a build once overwrote
    (folder / "notes.txt").write_text("my own notes\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    return folder_digest(folder)


def _inputs(tmp_path: Path) -> dict[str, str]:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    table = tmp_path / "t.csv"
    table.write_text("filepath,title\na.jpg,a cat\n")
    return {"shards": str(shards), "urls": str(urls), "table": str(table)}


def _spec_for(kind: str, inputs: dict, out: str, extra: str = "") -> str:
    if kind == "build":
        return build_spec(inputs["urls"], out, extra=", overwrite: true" if extra else "")
    if kind == "train":
        return train_spec(inputs["shards"], out, extra="overwrite: true\n" if extra else "")
    return eval_spec(inputs["table"], out) + ("overwrite: true\n" if extra else "")


@pytest.mark.parametrize("kind, field", [("build", "output.path"), ("train", "storage"), ("eval", "storage")])
def test_occupied_output_folder_is_refused_and_unchanged(tmp_path, kind, field):
    inputs = _inputs(tmp_path)
    out = tmp_path / "mine"
    before = _occupied(out)
    r, _ = clipforge("run", str(write_spec(tmp_path / "spec.yaml", _spec_for(kind, inputs, str(out)))))
    one_error_line(r, EXIT_INVALID, f"field `{field}`", str(out), "`notes.txt`", "overwrite: true")
    assert folder_digest(out) == before


@pytest.mark.parametrize("kind", ["build", "train", "eval"])
def test_output_of_another_job_is_refused(tmp_path, kind):
    inputs = _inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".clipforge-output").write_text('{"kind": "train", "name": "someone-else"}\n')
    before = folder_digest(out)
    r, _ = clipforge("run", str(write_spec(tmp_path / "spec.yaml", _spec_for(kind, inputs, str(out)))))
    one_error_line(r, EXIT_INVALID, "another clipforge job", "`someone-else`")
    assert folder_digest(out) == before


def test_empty_and_current_folder_outputs_are_refused(tmp_path):
    inputs = _inputs(tmp_path)
    before = folder_digest(tmp_path)
    for out, needle in (("", "must not be empty"), (".", "current folder"), ("./", "current folder")):
        spec = write_spec(tmp_path / "spec.yaml", build_spec(inputs["urls"], out))
        before = folder_digest(tmp_path)
        r, _ = clipforge("run", str(spec), cwd=tmp_path)
        one_error_line(r, EXIT_INVALID, "field `output.path`", needle)
        assert folder_digest(tmp_path) == before


def test_overwrite_true_writes_into_an_occupied_folder(tmp_path):
    """`overwrite: true`: the build runs in a folder holding other files, replaces those of its own names
    (stats.json) and leaves the others alone."""
    inputs = _inputs(tmp_path)
    out = tmp_path / "mine"
    before = _occupied(out)
    # Its one row fails (nothing listens at its URL): this test is about the folder, so a build of no samples is
    # accepted (min_success_fraction: 0).
    spec = _spec_for("build", inputs, str(out), extra="overwrite") + "min_success_fraction: 0\n"
    r, _ = clipforge("run", str(write_spec(tmp_path / "spec.yaml", spec)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = folder_digest(out)
    assert {k: after[k] for k in ("notes.txt", "sub/data.bin")} == {k: before[k] for k in ("notes.txt", "sub/data.bin")}
    assert after["stats.json"] != before["stats.json"] and "00000.tar" in after
    assert '"kind": "build"' in (out / ".clipforge-output").read_text()


def test_a_rerun_of_the_same_job_is_accepted(tmp_path):
    from clipforge.runtime.output_folder import OutputOwner, claim_output_folder

    owner = OutputOwner("train", "t", "storage", own_names=("spec.yaml",), signature=("spec.yaml",))
    out = tmp_path / "run"
    assert claim_output_folder(str(out), owner) is False  # fresh
    (out / "spec.yaml").write_text("kind: train\n")
    assert claim_output_folder(str(out), owner) is True  # its own output: resumed
    other = OutputOwner("train", "u", "storage", own_names=("spec.yaml",), signature=("spec.yaml",))
    from clipforge.errors import OutputFolderError

    with pytest.raises(OutputFolderError, match="another clipforge job"):
        claim_output_folder(str(out), other)
    # A folder written before the marker existed is adopted only when everything in it is the job's own.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "spec.yaml").write_text("kind: train\n")
    assert claim_output_folder(str(legacy), owner) is True
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "spec.yaml").write_text("kind: train\n")
    (tmp_path / "mixed" / "thesis.tex").write_text("\\section{}\n")
    with pytest.raises(OutputFolderError, match="thesis.tex"):
        claim_output_folder(str(tmp_path / "mixed"), owner)


# -- run-time input errors: one line each ------------------------------------------------------------------------

def test_shard_glob_matching_nothing_is_one_line(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", train_spec(str(tmp_path / "nothing-*.tar"), str(tmp_path / "run")))
    r, _ = clipforge("run", str(spec))
    one_error_line(r, EXIT_FAILED, "data.shards", "matches no files")
    assert not (tmp_path / "run").exists()


def test_bad_eval_table_is_one_line(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("path,caption\na.jpg,a cat\n")  # neither default column
    spec = write_spec(tmp_path / "spec.yaml", eval_spec(str(table), str(tmp_path / "out")))
    r, _ = clipforge("run", str(spec))
    one_error_line(r, EXIT_FAILED, "task 'd' (zeroshot_retrieval)", str(table), "filepath")
    assert not (tmp_path / "out").exists()


def test_missing_model_checkpoint_is_one_line(tmp_path):
    inputs = _inputs(tmp_path)
    spec = write_spec(tmp_path / "spec.yaml", train_spec(inputs["shards"], str(tmp_path / "run")).replace(
        "model: {name: tiny}", f"model: {{name: tiny, checkpoint: '{tmp_path / 'no-such-run'}'}}"))
    r, _ = clipforge("run", str(spec))
    one_error_line(r, EXIT_FAILED, "no-such-run", "does not exist")


# -- every command: typical bad options --------------------------------------------------------------------------

@pytest.mark.parametrize("args, code, needles", [
    (["validate", "missing.yaml"], EXIT_INVALID, ["missing.yaml", "spec file not found"]),
    (["run", "missing.yaml"], EXIT_INVALID, ["missing.yaml", "spec file not found"]),
    (["schema", "trian"], EXIT_INVALID, ["unknown kind 'trian'"]),
    (["submit", "configs/demo/train_tiny.yaml", "--address", "http://127.0.0.1:9", "--connect-timeout", "1"],
     EXIT_FAILED, ["127.0.0.1:9"]),
    (["jobs", "list", "--address", "http://127.0.0.1:9", "--connect-timeout", "1"], EXIT_FAILED, ["127.0.0.1:9"]),
    (["render", "kuberay", "configs/demo/train_tiny.yaml", "scaling.workers=0"], EXIT_INVALID,
     ["override `scaling.workers=0`", "scaling.workers"]),
    (["dashboard", "--runs", "/nonexistent/runs"], EXIT_INVALID, ["/nonexistent/runs"]),
    (["export", "/nonexistent/run", "--out", "OUT"], EXIT_FAILED, ["/nonexistent/run"]),
    (["predict", "/nonexistent.png", "a cat", "--model", "/nonexistent/export"], EXIT_FAILED, ["/nonexistent"]),
    (["export-report", "--checkpoint", "/nonexistent/run", "--fashion-dir", "/nonexistent/f", "--out", "OUT"],
     EXIT_FAILED, ["/nonexistent"]),
])
def test_every_command_reports_bad_input_in_one_line(tmp_path, args, code, needles):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    r, _ = clipforge(*args)
    one_error_line(r, code, *needles)
    assert not (tmp_path / "out").exists()


def test_a_bug_is_reported_as_internal_with_its_traceback():
    """The last line of defence: an exception that is not a user error is a bug, said so, exit 70."""
    import typer
    from typer.testing import CliRunner

    from clipforge.cli.errors import CommandGroup

    app = typer.Typer(cls=CommandGroup)

    @app.command()
    def broken() -> None:
        raise KeyError("oops")

    @app.command()
    def other() -> None:
        pass

    r = CliRunner().invoke(app, ["broken"])
    assert r.exit_code == EXIT_INTERNAL
    assert "error: internal error" in r.stderr and "KeyError" in r.stderr and "Traceback" in r.stderr
