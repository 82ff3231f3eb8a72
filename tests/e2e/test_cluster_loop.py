"""The whole loop on a cluster, as a user runs it: `clipforge submit` of the demo's tiny build, train and eval
specs to a head with 0 CPUs and two worker nodes of 1 CPU (`tests/multinode.py`), every path on s3:// (moto_server
is the only storage), then `clipforge dashboard` over the runs folder in the bucket.

The specs are configs/demo/*_tiny.yaml with their paths moved to the bucket and sizes cut to seconds; none
names a credential: the client's AWS settings reach the job through `clipforge submit` alone. Afterwards the test
reads from Ray's state API where the work ran (both worker nodes, never the head), and checks that client and
cluster, run with HOME and TMPDIR inside tmp_path, wrote nothing outside the cluster's folders, the bucket and the
caches a home may hold.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from clipforge.runtime.local_cluster import HEAD, S3_KEY_ID, S3_SECRET, LocalCluster

from http_fixtures import ImageServer
from multinode import REPO, client_env, running_cluster, wait_for
from ray_cluster import free_port
from s3_server import storage_options

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

DEMO_CONFIGS = REPO / "configs" / "demo"
JOB_TIMEOUT_S = 300
URLS = 48  # four shards of 12 at two shard tasks in flight: enough tasks for both worker nodes
SAMPLES_PER_SHARD = 12
CLASSES = ("circle", "square")
IMAGES_PER_CLASS = 3
WORKERS = ("worker-1", "worker-2")
# What a home may hold after the loop: caches that tools keep by design (none is needed for the test to pass;
# each is listed because a library run by the client or a node writes it there on its own).
ALLOWED_IN_HOME = (".cache", ".config/matplotlib", ".ray")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """HOME, TMPDIR and a working folder for the client and the cluster, all inside tmp_path."""
    base = tmp_path_factory.mktemp("loop")
    places = {name: base / name for name in ("home", "tmp", "work", "cluster", "specs")}
    for path in places.values():
        path.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # the nodes inherit this process's environment
        mp.setenv("HOME", str(places["home"]))
        mp.setenv("TMPDIR", str(places["tmp"]))
        yield places


@pytest.fixture(scope="module")
def cluster(sandbox) -> Iterator[LocalCluster]:
    with running_cluster(sandbox["cluster"]) as started:
        yield started


@pytest.fixture(scope="module")
def bucket(cluster):
    import s3fs

    options = {**storage_options(cluster.s3_endpoint), "key": S3_KEY_ID, "secret": S3_SECRET}
    return s3fs.S3FileSystem(**options)


def _clipforge(cluster: LocalCluster, sandbox: dict[str, Path], *args: str,
               timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """The real command line, as a user on a machine configured for the cluster and its store runs it."""
    env = client_env(cluster, HOME=str(sandbox["home"]), TMPDIR=str(sandbox["tmp"]))
    return subprocess.run([sys.executable, "-m", "clipforge", *args], capture_output=True, text=True,
                          env=env, cwd=sandbox["work"], timeout=timeout)


def _demo_spec(name: str) -> dict:
    return yaml.safe_load((DEMO_CONFIGS / name).read_text())


def _write_spec(sandbox: dict[str, Path], name: str, spec: dict) -> Path:
    path = sandbox["specs"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _url_list(images: ImageServer) -> str:
    rows = [f"{images.url(f'/img/64x48.jpg?seed={i}')},pattern number {i},test" for i in range(URLS)]
    return "url,caption,source\n" + "\n".join(rows) + "\n"


def _put_class_folder(bucket, prefix: str) -> None:
    from http_fixtures import encode_image, pattern_image

    for label, name in enumerate(CLASSES):
        for i in range(IMAGES_PER_CLASS):
            bucket.pipe(f"{prefix}/{name}/{i}.png", encode_image(pattern_image(32, 32, seed=label * 10 + i), "png"))


def _submit(cluster, sandbox, spec: Path, *options: str) -> str:
    """Submit `spec`, wait for the job to end, and return its id; fails the test unless it SUCCEEDED."""
    r = _clipforge(cluster, sandbox, "submit", str(spec), "--address", cluster.dashboard_url, *options)
    assert r.returncode == 0, f"{spec.name}: submit failed\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    job_id = r.stdout.splitlines()[0].strip()
    assert f"job {job_id} SUCCEEDED" in r.stderr, r.stderr[-3000:]
    status = _clipforge(cluster, sandbox, "jobs", "status", job_id, timeout=60)
    assert status.stdout.startswith(f"{job_id}: SUCCEEDED"), status.stdout + status.stderr
    return job_id


# -- where the work ran -------------------------------------------------------------------------------------


def _ray_job_id(cluster: LocalCluster, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(cluster.dashboard_url).get_job_info(submission_id)
    assert info.job_id, f"job {submission_id} has no Ray job id"
    return info.job_id


def _wait_for_placement_groups_removed(cluster: LocalCluster, timeout_s: float = 120) -> None:
    """Until no placement group holds resources: Ray Data spreads the eval's actors over the nodes that have room,
    and a finished training job's group is removed asynchronously (its workers' node would look full)."""
    from ray.util.state import list_placement_groups

    deadline = time.monotonic() + timeout_s
    while True:
        held = list_placement_groups(address=cluster.dashboard_url, filters=[("state", "=", "CREATED")],
                                     raise_on_missing_output=False)
        if not held:
            return
        assert time.monotonic() < deadline, f"placement groups still held after {timeout_s} s: {held}"
        time.sleep(1)


def _node_names(cluster: LocalCluster) -> dict[str, str]:
    return {node.node_id: node.name for node in cluster.nodes() if node.node_id}


def _task_nodes(cluster: LocalCluster, job_id: str, name_part: str) -> dict[str, int]:
    """{node name: tasks} of the job's tasks whose function name holds `name_part`."""
    from ray.util.state import list_tasks

    names = _node_names(cluster)
    tasks = list_tasks(address=cluster.dashboard_url, filters=[("job_id", "=", job_id)], detail=True,
                       limit=10000, raise_on_missing_output=False)
    found: dict[str, int] = {}
    for task in tasks:
        if name_part in task.name and task.type != "DRIVER_TASK" and task.node_id:
            node = names.get(task.node_id, task.node_id)
            found[node] = found.get(node, 0) + 1
    return found


def _actor_nodes(cluster: LocalCluster, job_id: str, class_part: str) -> dict[str, int]:
    """{node name: actors} of the job's actors whose class name holds `class_part`."""
    from ray.util.state import list_actors

    names = _node_names(cluster)
    actors = list_actors(address=cluster.dashboard_url, filters=[("job_id", "=", job_id)], detail=True,
                         limit=10000, raise_on_missing_output=False)
    found: dict[str, int] = {}
    for actor in actors:
        if class_part in actor.class_name and actor.node_id:
            node = names.get(actor.node_id, actor.node_id)
            found[node] = found.get(node, 0) + 1
    return found


def _assert_on_both_workers(what: str, nodes: dict[str, int]) -> None:
    assert HEAD not in nodes, f"{what} ran on the head (0 CPUs): {nodes}"
    assert set(nodes) == set(WORKERS), f"{what} did not run on both worker nodes: {nodes}"


# -- what was written where ---------------------------------------------------------------------------------


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


@contextlib.contextmanager
def _dashboard(cluster, sandbox, runs: str) -> Iterator[str]:
    port = free_port()
    env = client_env(cluster, HOME=str(sandbox["home"]), TMPDIR=str(sandbox["tmp"]))
    log = open(sandbox["cluster"] / "dashboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "clipforge", "dashboard", "--runs", runs, "--port", str(port),
                             "--no-compute-estimates", "--no-try"], env=env, cwd=sandbox["work"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers():
        if proc.poll() is not None:
            pytest.fail(f"the dashboard ended ({proc.returncode}); see {log.name}")
        return _get_json(f"{url}/api/runs")

    try:
        wait_for(answers, 60, "the dashboard answers")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


# -- the loop -----------------------------------------------------------------------------------------------


def test_build_train_eval_and_dashboard_on_a_cluster_with_object_storage_only(cluster, bucket, sandbox):
    store = f"s3://{cluster.s3_bucket}"
    home_before = _files_under(sandbox["home"])

    with ImageServer() as images:
        bucket.pipe(f"{cluster.s3_bucket}/lists/train_urls.csv", _url_list(images).encode())
        _put_class_folder(bucket, f"{cluster.s3_bucket}/data/fashion")

        build = _demo_spec("build_train_tiny.yaml")
        build["input"]["path"] = f"{store}/lists/train_urls.csv"
        build["output"].update(path=f"{store}/shards/train", samples_per_shard=SAMPLES_PER_SHARD)
        build_file = _write_spec(sandbox, "build", build)
        build_job = _submit(cluster, sandbox, build_file, "--follow")
        fetched = sum(count for path, count in images.hits.items() if path.startswith("/img/"))
        assert fetched >= URLS  # by the cluster's nodes: the URLs name this test's loopback server

    shards = sorted(p for p in bucket.ls(f"{cluster.s3_bucket}/shards/train") if p.endswith(".tar"))
    assert len(shards) == URLS // SAMPLES_PER_SHARD, shards

    train = _demo_spec("train_tiny.yaml")
    train["storage"] = f"{store}/runs/train"
    train["data"].update(shards=[f"{store}/shards/train"], batch_size=8)
    train["optim"].update(epochs=1, warmup_steps=1)
    train["checkpoint"]["every_epochs"] = 1
    train["log_every_steps"] = 1
    train_job = _submit(cluster, sandbox, _write_spec(sandbox, "train", train))
    assert bucket.exists(f"{cluster.s3_bucket}/runs/train/summary.json")

    evaluation = _demo_spec("eval_tiny.yaml")
    evaluation["storage"] = f"{store}/runs/eval"
    evaluation["model"]["checkpoint"] = f"{store}/runs/train"
    retrieval, zeroshot = evaluation["tasks"]
    retrieval["shards"] = [f"{store}/shards/train"]
    zeroshot.update(image_folder=f"{store}/data/fashion", classnames=list(CLASSES))
    _wait_for_placement_groups_removed(cluster)
    eval_job = _submit(cluster, sandbox, _write_spec(sandbox, "eval", evaluation))

    # No spec carries a credential: the job got the store's settings from the client's environment.
    for spec_file in sandbox["specs"].iterdir():
        text = spec_file.read_text()
        assert S3_KEY_ID not in text and S3_SECRET not in text and "AWS_" not in text, spec_file

    # Placement: every stage's parallel work ran on both worker nodes, none on the 0-CPU head.
    _assert_on_both_workers("the build's shard tasks",
                            _task_nodes(cluster, _ray_job_id(cluster, build_job), "iter_build_shard"))
    _assert_on_both_workers("the Ray Train workers",
                            _actor_nodes(cluster, _ray_job_id(cluster, train_job), "RayTrainWorker"))
    eval_ray_job = _ray_job_id(cluster, eval_job)
    eval_nodes = _task_nodes(cluster, eval_ray_job, "")
    for node, count in _actor_nodes(cluster, eval_ray_job, "").items():
        eval_nodes[node] = eval_nodes.get(node, 0) + count
    eval_nodes.pop(HEAD, None)  # Ray's own 0-CPU bookkeeping actors (the job's supervisor) live on the head
    _assert_on_both_workers("the eval's Ray Data tasks and actors", eval_nodes)

    # The dashboard over the bucket lists both runs with their metrics.
    with _dashboard(cluster, sandbox, f"{store}/runs") as url:
        listing = _get_json(f"{url}/api/runs")
        rows = {row["id"]: row for row in listing["runs"]}
        assert {"train", "eval"} <= set(rows), sorted(rows)
        assert rows["train"]["kind"] == "train" and rows["train"]["step"] > 0 and rows["train"]["loss"] > 0
        assert rows["eval"]["kind"] == "eval" and rows["eval"]["evals"], rows["eval"]
        # Eval metrics are keyed "model label · dataset · task · metric".
        keys = [m.split(" · ") for m in listing["metrics"]]
        assert ["trained", "fashion_mnist", "zeroshot_classification", "acc1"] in keys, listing["metrics"]
        assert ["trained", "tuxpaint_heldout", "zeroshot_retrieval", "image_retrieval_recall@1"] in keys, keys
        run = _get_json(f"{url}/api/run?id=train")
        assert [r["step"] for r in run["records"] if "loss" in r], run

    # Nothing written outside the cluster's folders, the bucket and a home's caches.
    assert _files_under(sandbox["work"]) == [], "files written to the client's working folder"
    new_in_home = [f for f in _files_under(sandbox["home"]) if f not in home_before]
    assert [f for f in new_in_home if not f.startswith(ALLOWED_IN_HOME)] == [], new_in_home
