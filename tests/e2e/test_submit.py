"""`clipforge submit` and `clipforge jobs ...` against a real Ray head on 127.0.0.1 (conftest's `ray_head`,
see ray_cluster.py).

The jobs are real: `kind: build` runs downloading from a loopback HTTP server started here, and a tiny
`kind: train` run on shards written here.
"""
from __future__ import annotations

import io
import socket
import subprocess
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from clipforge.cluster.specs import load_spec
from clipforge.cluster.submit import JOB_DIR, ClusterError, connect, job_status, resolve_address, staged_job

from ray_cluster import CLIENT_ENV, JOB_TIMEOUT_S, cli, free_port

# ---------------------------------------------------------------- no cluster needed


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://10.0.0.5:8265", "http://10.0.0.5:8265"),
        ("10.0.0.5:9000", "http://10.0.0.5:9000"),
        ("head.example.org", "http://head.example.org:8265"),
        ("https://head.example.org/", "https://head.example.org:8265"),
        ("ray://10.0.0.5:10001", "http://10.0.0.5:8265"),
    ],
)
def test_resolve_address(given, expected):
    assert resolve_address(given) == expected


@pytest.mark.parametrize("bad", ["ftp://x:1", "http://:8265", "http://h:port", "auto", "http://h:8265/api"])
def test_resolve_address_rejects_bad_urls(bad):
    with pytest.raises(ClusterError, match="address"):
        resolve_address(bad)


def test_address_falls_back_to_environment(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.1.1.1:8265")
    assert resolve_address(None) == "http://10.1.1.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.2.2.2:8265")
    assert resolve_address(None) == "http://10.2.2.2:8265"
    assert resolve_address("http://10.3.3.3:1") == "http://10.3.3.3:1"


BUILD = """\
kind: build
name: {name}
input: {{path: {input}}}
output: {{path: {output}, samples_per_shard: 10}}
download: {{allow_private_networks: true, timeout_s: {timeout}, retries: 0, threads_per_worker: 4}}
resize: {{size: 32}}
scaling: {{workers: 1, cpus_per_worker: 0.5}}
ray:
  address: ray://somewhere:10001
  runtime_env:
    env_vars: {{CLIPFORGE_TEST_VAR: "42"}}
"""


def write_build(path: Path, *, name="submit-test", input="data/urls.csv",  # noqa: A002 - the spec field it fills
                output="/tmp/out", timeout=10) -> Path:
    path.write_text(BUILD.format(name=name, input=input, output=output, timeout=timeout))
    return path


def test_staged_job_ships_the_spec_alone(tmp_path):
    spec = load_spec(write_build(tmp_path / "b.yaml"))
    with staged_job(spec) as (entrypoint, env):
        wd = Path(env["working_dir"])
        assert entrypoint == "python -m clipforge run spec.yaml"
        assert sorted(p.name for p in wd.iterdir()) == ["spec.yaml"]
        shipped = yaml.safe_load((wd / "spec.yaml").read_text())
        # On the cluster the job joins the cluster it runs on; the runtime_env is the job's own.
        assert shipped["ray"] == {"address": None, "runtime_env": {}}
        assert shipped["input"]["path"] == "data/urls.csv"
        assert env["env_vars"]["CLIPFORGE_TEST_VAR"] == "42"
    assert not wd.exists()


def test_staged_job_with_working_dir_keeps_the_spec_past_ignore_rules(tmp_path):
    user = tmp_path / "project"
    (user / "data").mkdir(parents=True)
    (user / "data" / "urls.csv").write_text("url,caption\n")
    (user / ".gitignore").write_text("*.yaml\n.c*\n")
    spec = load_spec(write_build(tmp_path / "b.yaml"), ["ray.runtime_env.excludes=[.clipforge-job]"])
    with staged_job(spec, user) as (entrypoint, env):
        wd = Path(env["working_dir"])
        assert entrypoint == f"python -m clipforge run {JOB_DIR}/spec.yaml"
        assert (wd / "data").is_symlink() and (wd / "data" / "urls.csv").read_text() == "url,caption\n"
        assert (wd / JOB_DIR / "spec.yaml").is_file()
        # The user's ignore rules still apply, except to the shipped spec.
        gitignore = (wd / ".gitignore").read_text().splitlines()
        assert gitignore[:2] == ["*.yaml", ".c*"] and f"!/{JOB_DIR}/**" in gitignore
        assert env["excludes"][0] == ".clipforge-job" and env["excludes"][-1] == f"!/{JOB_DIR}/**"
    assert (user / ".gitignore").read_text() == "*.yaml\n.c*\n"
    assert not (user / JOB_DIR).exists()


def test_staged_job_refuses_a_remote_working_dir(tmp_path):
    spec = load_spec(write_build(tmp_path / "b.yaml"), ["ray.runtime_env.working_dir=s3://b/code.zip"])
    with pytest.raises(ClusterError, match="remote package"):
        with staged_job(spec):
            pass


def _assert_one_error_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unreachable_cluster_is_one_clear_error(tmp_path):
    spec = write_build(tmp_path / "b.yaml")
    port = free_port()  # nothing listens there
    r = cli("submit", str(spec), "--address", f"http://127.0.0.1:{port}")
    _assert_one_error_line(r, "connection refused", f"127.0.0.1:{port}")
    assert r.stdout == ""
    r = cli("jobs", "list", "--address", "http://no-such-host.invalid:8265")
    _assert_one_error_line(r, "no-such-host.invalid", "unknown host")
    r = cli("jobs", "status", "x", "--address", "ftp://127.0.0.1:1")
    _assert_one_error_line(r, "bad cluster address")
    r = cli("jobs", "logs", "x")  # no --address and none in the environment
    _assert_one_error_line(r, "RAY_ADDRESS")


def test_invalid_spec_is_refused_before_connecting(tmp_path):
    spec = write_build(tmp_path / "b.yaml")
    r = cli("submit", str(spec), "scaling.workers=0", "--address", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "field `scaling.workers`" in r.stderr and "Traceback" not in r.stderr
    r = cli("submit", str(spec), "ray.runtime_env.pip=5", "--address", f"http://127.0.0.1:{free_port()}")
    _assert_one_error_line(r, "field `ray.runtime_env`", "pip")
    assert r.returncode == 2


def test_a_silent_server_times_out(tmp_path):
    with socket.socket() as server:  # accepts connections but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="timed out"):
            connect(url, timeout_s=1.0)
        assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------- a real Ray head (conftest's `ray_head`)


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


class ImageServer:
    """Loopback HTTP server: /img/N.png answers at once, /slow/N.png only once `release` is set."""

    def __init__(self):
        self.images = [_png(c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
        self.hits: list[str] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                kind, _, name = self.path.strip("/").partition("/")
                if kind == "slow":
                    outer.release.wait(timeout=300)
                try:
                    body = outer.images[int(name.split(".")[0])]
                except (ValueError, IndexError):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url_list(self, path: Path, kind: str) -> Path:
        rows = [f"{self.base}/{kind}/{i}.png,{c} square" for i, c in enumerate(("red", "green", "blue"))]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("url,caption\n" + "\n".join(rows) + "\n")
        return path


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer()
    server.thread.start()
    yield server
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.mark.slow
def test_submit_runs_a_build_on_the_cluster_and_follows_it(ray_head, image_server, tmp_path):
    project = tmp_path / "project"
    image_server.url_list(project / "data" / "urls.csv", "img")
    (project / ".gitignore").write_text("*.yaml\n")  # the shipped spec must survive this
    out = tmp_path / "shards"
    spec = write_build(project / "build.yaml", input="data/urls.csv", output=str(out))

    r = cli("submit", str(spec), "--address", ray_head, "--working-dir", str(project), "--follow")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    assert job_id.startswith("clipforge-submit-test-")
    assert f"job {job_id} SUCCEEDED" in r.stderr
    assert '"ok": 3' in r.stdout  # the followed log holds the build's summary

    # The job really ran on the cluster: it fetched every image and wrote a shard with all three.
    assert sorted(h for h in image_server.hits if h.startswith("/img/")) == ["/img/0.png", "/img/1.png",
                                                                               "/img/2.png"]
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        assert len([n for n in tar.getnames() if n.endswith(".jpg")]) == 3

    r = cli("jobs", "status", job_id, env={**CLIENT_ENV, "RAY_ADDRESS": ray_head})
    assert r.returncode == 0 and r.stdout.startswith(f"{job_id}: SUCCEEDED"), r.stdout + r.stderr
    r = cli("jobs", "logs", job_id, "--address", ray_head)
    assert r.returncode == 0
    assert f"python -m clipforge run {JOB_DIR}/spec.yaml" in r.stdout and "build submit-test" in r.stdout
    r = cli("jobs", "list", "--address", ray_head)
    assert r.returncode == 0
    row = next(line for line in r.stdout.splitlines() if line.startswith(job_id))
    assert row.split()[1:4] == ["SUCCEEDED", "build", "submit-test"]


@pytest.mark.slow
def test_a_failing_job_makes_submit_fail_with_its_message(ray_head, tmp_path):
    spec = write_build(tmp_path / "b.yaml", name="missing-input", input=str(tmp_path / "nope.csv"),
                       output=str(tmp_path / "out"))
    r = cli("submit", str(spec), "--address", ray_head)  # waits, printing status changes
    assert r.returncode == 1, r.stdout + r.stderr
    job_id = r.stdout.strip()
    assert f"{job_id}: FAILED" in r.stderr.splitlines()  # a status-change line
    assert f"job {job_id} FAILED" in r.stderr
    assert "nope.csv` does not exist" in r.stderr  # the job's own error, from its log tail


@pytest.mark.slow
def test_a_long_running_job_is_stopped(ray_head, image_server, tmp_path):
    urls = image_server.url_list(tmp_path / "slow.csv", "slow")
    spec = write_build(tmp_path / "slow.yaml", name="slow-build", input=str(urls), output=str(tmp_path / "out"),
                       timeout=600)
    r = cli("submit", str(spec), "--address", ray_head, "--no-wait")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()

    client = connect(ray_head)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(h.startswith("/slow/") for h in image_server.hits):  # the job is downloading: it runs
        assert job_status(client, job_id) in ("PENDING", "RUNNING"), job_status(client, job_id)
        assert time.monotonic() < deadline, "the job never reached the image server"
        time.sleep(0.5)
    assert job_status(client, job_id) == "RUNNING"

    r = cli("jobs", "stop", job_id, "--address", ray_head)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"{job_id}: STOPPED"
    r = cli("jobs", "status", job_id, "--address", ray_head)
    assert r.stdout.startswith(f"{job_id}: STOPPED")
    assert not list((tmp_path / "out").glob("*.tar"))  # stopped before any shard was finished


TRAIN = """\
kind: train
name: submit-train
storage: {storage}
model: {{name: tiny, trainable: all}}
data: {{shards: [{shards}], batch_size: 8, loader_workers: 0, shuffle_buffer: 0}}
optim: {{lr: 0.002, warmup_steps: 1, epochs: 1}}
checkpoint: {{every_epochs: 1, keep_last: 1}}
log_every_steps: 1
tensorboard: false
scaling: {{workers: 1, cpus_per_worker: 0.5}}
"""


@pytest.mark.slow
def test_submit_runs_a_tiny_training_to_success(ray_head, tmp_path):
    from train_fixtures import read_lines, step_lines, write_shards

    write_shards(tmp_path / "shards", [16])
    run_dir = tmp_path / "run"
    spec = tmp_path / "train.yaml"
    spec.write_text(TRAIN.format(storage=run_dir, shards=tmp_path / "shards"))

    r = cli("submit", str(spec), "--address", ray_head)  # waits, printing status changes
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.strip()
    assert f"{job_id}: RUNNING" in r.stderr.splitlines() and f"job {job_id} SUCCEEDED" in r.stderr

    r = cli("jobs", "status", job_id, "--address", ray_head)
    assert r.stdout.startswith(f"{job_id}: SUCCEEDED"), r.stdout + r.stderr
    r = cli("jobs", "logs", job_id, "--address", ray_head)
    assert r.returncode == 0
    assert "python -m clipforge run spec.yaml" in r.stdout and "training `submit-train` done: 2 steps" in r.stdout

    # 16 samples at batch 8: two optimizer steps, each logged with a finite loss, then the summary.
    steps = step_lines(read_lines((run_dir / "metrics.jsonl").read_text()))
    assert [m["step"] for m in steps] == [1, 2], steps
    assert all(0 < m["loss"] < 100 for m in steps)
    assert (run_dir / "summary.json").is_file()
