"""The local multi-node cluster (`clipforge.runtime.local_cluster`, `clipforge cluster up|status|down`): real
raylets on 127.0.0.1, real placement across them, node failure by SIGKILL, and a teardown that ends exactly
the cluster's processes and writes nowhere else."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from clipforge.runtime.local_cluster import STATE_FILE, LocalCluster, node_resource
from clipforge.runtime.local_cluster_processes import is_alive

import multinode
from build_outputs import write_url_list
from http_fixtures import ImageServer
from s3_server import s3fs_for

# Each cluster takes tens of seconds to start on 2 cores (a minute or more when they are busy).
pytestmark = [pytest.mark.multinode, pytest.mark.slow]

multinode_cluster = multinode.multinode_cluster  # the shared fixture: head + 2 workers of 1 CPU + moto S3
WORKERS = ("worker-1", "worker-2")

NODES_AND_PINNED_TASKS = """
    import json, os, ray
    ray.init(log_to_driver=False)
    nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]

    @ray.remote(num_cpus=0.25)
    def where():
        return ray.get_runtime_context().get_node_id(), os.getpid()

    pinned = {w: ray.get(where.options(resources={r: 0.5}).remote()) for w, r in %s}
    print(json.dumps({"nodes": nodes, "pinned": pinned}))
"""

DETACHED_ACTOR_ON = """
    import json, ray
    ray.init(namespace="local-cluster-test", log_to_driver=False)

    @ray.remote(num_cpus=0.25, resources={%r: 0.5}, lifetime="detached", name="resident")
    class Resident:
        def pid(self):
            import os
            return os.getpid()

    print(json.dumps(ray.get(Resident.remote().pid.remote())))
"""


def _by_name(cluster: LocalCluster) -> dict:
    return {info.name: info for info in cluster.nodes()}


def test_head_and_two_workers_are_alive_with_their_cpus_and_resources(multinode_cluster):
    infos = _by_name(multinode_cluster)
    assert list(infos) == ["head", *WORKERS]
    assert all(info.alive and info.pids and info.node_id for info in infos.values()), infos
    assert len({info.node_id for info in infos.values()}) == 3
    assert infos["head"].cpus == 0
    assert [infos[w].cpus for w in WORKERS] == [1, 1]
    for name, info in infos.items():
        mine = {r for r in info.resources if r.startswith("clipforge_")}
        assert mine == {node_resource(name)} and info.resources[node_resource(name)] == 1, info.resources
    # A real driver sees the same cluster, and work pinned by a node's resource runs on that node.
    pairs = [(w, node_resource(w)) for w in WORKERS]
    seen = multinode.last_json_line(multinode.run_driver(multinode_cluster, NODES_AND_PINNED_TASKS % pairs))
    alive = {n["id"]: n["resources"] for n in seen["nodes"] if n["alive"]}
    assert set(alive) == {info.node_id for info in infos.values()}
    assert alive[infos["worker-2"].node_id].get("CPU") == 1 and "CPU" not in alive[infos["head"].node_id]
    for worker in WORKERS:
        node_id, pid = seen["pinned"][worker]
        assert node_id == infos[worker].node_id
        assert pid not in infos["head"].pids  # a worker process of that node, not of the head


def _build_spec(path: Path, urls: Path, output: str) -> Path:
    spec = {
        "kind": "build", "name": "multinode-build",
        "input": {"path": str(urls)},
        "output": {"path": output, "samples_per_shard": 3},
        "download": {"allow_private_networks": True, "timeout_s": 10.0, "retries": 0, "threads_per_worker": 3},
        "resize": {"size": 24, "mode": "border"},
        # 0.6 CPU: one shard task at a time fits a 1-CPU worker node, so concurrent shards need both workers.
        "scaling": {"workers": 2, "cpus_per_worker": 0.6},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _shard_task_nodes(cluster: LocalCluster, shards: int, monkeypatch) -> list[str]:
    """Node ids of the finished shard tasks, from Ray's state API (task events arrive within seconds)."""
    from ray.util.state import list_tasks

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # it would override the address given below
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)

    def finished():
        tasks = [t for t in list_tasks(address=cluster.dashboard_url, limit=10_000, detail=True)
                 if t.name.endswith("iter_build_shard") and t.state == "FINISHED"]
        return [t.node_id for t in tasks] if len(tasks) >= shards else None

    return multinode.wait_for(finished, 30, f"{shards} finished shard tasks in Ray's state API")


def test_build_on_the_cluster_runs_shards_on_both_workers_and_writes_to_s3(multinode_cluster, tmp_path,
                                                                          monkeypatch):
    cluster = multinode_cluster
    output = f"s3://{cluster.s3_bucket}/{uuid.uuid4().hex[:8]}/shards"
    with ImageServer() as server:
        # Each image takes 1 s to arrive, so the shards overlap in time and cannot all queue on one node.
        rows = [(server.url(f"/slow?delay=1&n={i}"), f"caption {i}") for i in range(12)]
        urls = write_url_list(tmp_path / "urls.parquet", rows)
        spec = _build_spec(tmp_path / "build.yaml", urls, output)
        run = subprocess.run([sys.executable, "-m", "clipforge", "run", str(spec)], capture_output=True, text=True,
                             env=multinode.client_env(cluster), cwd=multinode.REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    fs = s3fs_for(cluster.s3_endpoint)
    assert sorted(Path(p).name for p in fs.glob(f"{output}/*.tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert json.loads(fs.cat(f"{output}/stats.json"))["status_counts"]["ok"] == 12

    task_nodes = _shard_task_nodes(cluster, 4, monkeypatch)
    infos = _by_name(cluster)
    assert set(task_nodes) == {infos[w].node_id for w in WORKERS}, (task_nodes, infos)


def test_kill_worker_ends_every_process_of_the_node_and_add_worker_replaces_it(multinode_cluster):
    cluster = multinode_cluster
    actor_pid = multinode.last_json_line(
        multinode.run_driver(cluster, DETACHED_ACTOR_ON % node_resource("worker-1")))
    before = cluster.pids("worker-1")
    raylets = [pid for pid in before if multinode.process_name(pid) == "raylet"]
    assert actor_pid in before and len(raylets) == 1, (actor_pid, before)
    others = {name: cluster.pids(name) for name in ("head", "worker-2")}
    other_raylets = [pid for pids in others.values() for pid in pids if multinode.process_name(pid) == "raylet"]

    killed = cluster.kill_worker("worker-1")

    assert set(before) <= set(killed)
    assert [pid for pid in killed if is_alive(pid)] == []
    assert cluster.pids("worker-1") == []
    assert all(is_alive(pid) for pid in other_raylets) and len(other_raylets) == 2
    dead = cluster.wait_for_node("worker-1", alive=False, timeout_s=120)
    assert not dead.alive and dead.node_id == _by_name(cluster)["worker-1"].node_id

    assert cluster.add_worker(cpus=1) == "worker-3"
    infos = _by_name(cluster)
    assert [name for name, info in infos.items() if info.alive] == ["head", "worker-2", "worker-3"]
    assert infos["worker-3"].cpus == 1 and infos["worker-3"].resources[node_resource("worker-3")] == 1
    assert not infos["worker-1"].alive and infos["worker-1"].pids == []


# -- the command line, as a user runs it ---------------------------------------------------------------------


def _user_env(home: Path, tmp: Path) -> dict[str, str]:
    """A user's environment with HOME (and the default cluster folder under it) and TMPDIR inside the test."""
    dropped = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "AWS_PROFILE", "XDG_STATE_HOME", "CLIPFORGE_CLUSTER_DIR",
               "RAY_TMPDIR"}
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("AWS_")}
    return {**env, "HOME": str(home), "TMPDIR": str(tmp)}


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge", *args], capture_output=True, text=True, env=env,
                          cwd=env["HOME"], timeout=timeout)


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def cli_lifecycle(tmp_path_factory):
    """`clipforge cluster up --nodes 1 --s3`, `status`, `jobs list` on its dashboard, then `down`, in fresh
    processes whose HOME and TMPDIR are test folders; a process that is not the cluster's runs throughout."""
    base = tmp_path_factory.mktemp("cli")
    home, tmp = base / "home", base / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = _user_env(home, tmp)
    root = home / ".local" / "state" / "clipforge" / "local-cluster"  # the documented default
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("the user's own file\n")
    result: dict = {"root": root, "home": home, "tmp": tmp, "bystanders": []}
    try:
        result["up"] = _cli(env, "cluster", "up", "--nodes", "1", "--s3", "--object-store-mb", "200")
        assert result["up"].returncode == 0, result["up"].stderr[-4000:]
        cluster = LocalCluster.load(root)
        result["temp_root"] = cluster.temp_root
        # A user's shell reading the head's logs: it names the cluster's folders but is not the cluster's.
        result["bystanders"].append(subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)", "raylet", str(cluster.temp_root / "head")],
            cwd=cluster.temp_root / "head", start_new_session=True))
        result["status"] = _cli(env, "cluster", "status")
        result["jobs"] = _cli(env, "jobs", "list", "--address", cluster.dashboard_url)
        result["pids"] = cluster.all_pids()
        result["down"] = _cli(env, "cluster", "down")
        result["status_after"] = _cli(env, "cluster", "status")
        yield result
    finally:
        if (root / STATE_FILE).exists():
            LocalCluster.load(root).stop()
        for proc in result["bystanders"]:
            proc.kill()
            proc.wait()


def test_cli_up_status_down_stops_exactly_the_clusters_processes(cli_lifecycle):
    r = cli_lifecycle
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", r["up"].stdout, re.M))
    assert set(exports) >= {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "AWS_ENDPOINT_URL",
                            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, r["up"].stdout
    assert f"--address {exports['RAY_API_SERVER_ADDRESS']}" in r["up"].stderr

    assert r["status"].returncode == 0, r["status"].stderr
    table = {line.split()[0]: line.split()[1:] for line in r["status"].stdout.splitlines()
             if line.startswith(("head ", "worker-"))}
    assert table["head"][:3] == ["yes", "0", "clipforge_head"] and table["worker-1"][:3] == ["yes", "1",
                                                                                            "clipforge_worker_1"]
    assert exports["AWS_ENDPOINT_URL"] in r["status"].stdout
    assert r["jobs"].returncode == 0, r["jobs"].stderr  # the printed dashboard URL is a working job server

    assert r["down"].returncode == 0, r["down"].stderr
    assert len(r["pids"]) >= 8  # 2 x (ray start, raylet, agents, ...) + gcs, dashboard + moto_server
    assert [pid for pid in r["pids"] if is_alive(pid)] == []
    assert all(proc.poll() is None for proc in r["bystanders"])  # named the cluster's folders, yet untouched
    assert r["status_after"].returncode == 1 and "no local cluster" in r["status_after"].stderr


def test_cli_cluster_writes_only_into_its_folders(cli_lifecycle):
    r = cli_lifecycle
    root, home = r["root"], r["home"]
    # In HOME only the cluster's folder (the default --dir), where the user's file is left alone and the logs kept.
    assert {p for p in _files_under(home) if not p.startswith(".local/state/clipforge/local-cluster/")} == {
        ".local", ".local/state", ".local/state/clipforge", ".local/state/clipforge/local-cluster"}
    assert (root / "notes.txt").read_text() == "the user's own file\n"
    assert {"logs/head.log", "logs/worker-1.log", "logs/moto.log"} <= _files_under(root)
    assert not (root / STATE_FILE).exists()
    assert not (home / "ray_results").exists()
    # Nothing in TMPDIR (Ray's default temp dir would be TMPDIR/ray); the nodes' temp dirs are gone.
    assert _files_under(r["tmp"]) == set()
    assert not r["temp_root"].exists()
