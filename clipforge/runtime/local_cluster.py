"""A Ray cluster of several nodes on this machine: a head and N worker nodes on 127.0.0.1, each its own raylet,
and optionally `moto_server` as the cluster's one S3 object store. For trying the cluster path locally
(`clipforge cluster up|status|down`) and for tests that need several nodes.

Each node is a `ray start --block` process started in a session of its own, with its own ports, its own Ray temp
dir and a custom resource naming it (`clipforge_worker_1: 1` on `worker-1`, `clipforge_head: 1` on the head), so
work can be pinned to a node. The head runs the dashboard and job server (`clipforge submit --address
DASHBOARD_URL`). Nodes are found again by process id, session and a token in their environment
(`local_cluster_processes.py`), so `stop()` and `kill_worker()` end exactly the processes of this cluster, also
from another process than the one that started it: everything needed is recorded in ROOT/cluster.json.

Clients reach the head at 127.0.0.1 (GCS and dashboard); Ray itself advertises every node at this machine's own
address even when told 127.0.0.1, so the nodes' ports may be reachable from the network like any `ray start`'s.

Layout: ROOT/cluster.json (the state), ROOT/logs/NODE.log (each `ray start`'s output; moto.log). Ray's temp dirs
live under a short /tmp/cf-XXXXXXXX/NODE, because Ray puts unix sockets there and a socket path may not exceed
107 bytes; `stop()` removes that folder and the state file, and keeps the logs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from clipforge.errors import UserError
from clipforge.runtime.local_cluster_processes import TOKEN_VAR, NodeMark, NodeTracker, kill_all, terminate, wait_gone
from clipforge.runtime.local_ray_reaper import TOKEN_VAR as LOCAL_RAY_TOKEN_VAR
from clipforge.runtime.proc_table import read_stat

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
LOGS_DIR = "logs"
HEAD = "head"
_STATE_VERSION = 1
# Ray's unix sockets live under a node's temp dir; /tmp keeps their paths short whatever ROOT is.
_TEMP_PARENT = "/tmp"
_TEMP_PREFIX = "cf-"
_TEMP_MARKER = ".clipforge-local-cluster"  # holds the cluster id: stop() removes only a temp dir it made
# Generous: on a busy 2-core machine a head takes tens of seconds to bring up its dashboard.
HEAD_START_TIMEOUT_S = 240.0
WORKER_START_TIMEOUT_S = 180.0
MOTO_START_TIMEOUT_S = 90.0
START_ATTEMPTS = 4  # of one node whose `ray start` ends during start-up (see LocalCluster._start_node)
RETRY_PAUSE_S = 5.0
STOP_GRACE_S = 10.0  # for `ray start --block` to stop its node on SIGTERM, before everything left is killed
_POLL_S = 1.0  # each look at a node asks the head's dashboard, which a busy machine can ill afford
_HTTP_TIMEOUT_S = 10.0

# The object store's settings, handed to the nodes and to clients (moto accepts any credentials).
S3_BUCKET = "clipforge"
S3_REGION = "us-east-1"
S3_KEY_ID = "clipforge-local"
S3_SECRET = "clipforge-local-secret"

# Ports each node listens on (`ray start --NAME=PORT`), and those only the head has. Workers bind ports the
# system picks (--min/max-worker-port=0), so the nodes never compete for Ray's default worker port range.
_NODE_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "runtime-env-agent-port")
_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
# Variables of this process that must not reach the nodes: they point at another cluster, or would make a
# watchdog of a private local Ray (or an earlier cluster's tracking) count the nodes as its own.
_NOT_FOR_NODES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", TOKEN_VAR, LOCAL_RAY_TOKEN_VAR)


class LocalClusterError(UserError):
    """A local cluster that cannot be started, found or reached; the message names the folder or log file."""


class _NodeEnded(Exception):
    """A node's `ray start` process ended while the node was starting."""


@dataclass
class NodeInfo:
    """One node as Ray sees it (`alive`, `cpus`, `resources`, `node_id`) and as /proc does (`pids`)."""

    name: str
    node_id: str | None  # None while Ray does not know the node (yet)
    alive: bool
    cpus: float
    pids: list[int]
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class _Node:
    """What the state file records of one node (or of moto_server, which is tracked the same way)."""

    name: str
    cpus: int
    temp_dir: str | None
    log: str
    token: str
    pid: int
    start_ticks: int | None
    ports: dict[str, int]
    killed: bool = False

    def mark(self, leader_valid: bool) -> NodeMark:
        return NodeMark(token=self.token, temp_dir=self.temp_dir, leader_pid=self.pid if leader_valid else None,
                        leader_start=self.start_ticks)


def node_resource(name: str) -> str:
    """The custom resource that names node `name` (one unit of it per node): `worker-1` -> `clipforge_worker_1`."""
    return "clipforge_" + name.replace("-", "_")


def _host_identity() -> str:
    """This boot of this machine: recorded pids mean the same processes only within it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open while picking, so none is picked twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _executable(name: str, install_hint: str) -> str:
    """An executable of this Python environment (the nodes must run the same Ray and clipforge as this process)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise LocalClusterError(f"`{name}` is not installed next to {sys.executable}: {install_hint}")
    return str(path)


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def s3_env(endpoint: str) -> dict[str, str]:
    """AWS settings that reach the cluster's moto_server (for the nodes and for clients)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION, "AWS_EC2_METADATA_DISABLED": "true"}


class LocalCluster:
    """A head and worker nodes on 127.0.0.1 (and moto_server), started by `start()` or found by `load()`."""

    def __init__(self, root: Path, state: dict[str, Any]):
        self.root = root
        self._state = state
        self._nodes = [_Node(**n) for n in state["nodes"]]
        self._moto = _Node(**state["moto"]) if state.get("moto") else None
        self._leaders_valid = state["host"] == _host_identity()
        self._children: dict[str, subprocess.Popen] = {}  # processes this object started, to reap once ended

    # -- what clients need ------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address, `127.0.0.1:PORT` (what RAY_ADDRESS and `ray.init(address=...)` take)."""
        return self._state["address"]

    @property
    def dashboard_url(self) -> str:
        """The head's dashboard and job server, `http://127.0.0.1:PORT` (`clipforge submit --address`)."""
        return self._state["dashboard_url"]

    @property
    def s3_endpoint(self) -> str | None:
        """moto_server's URL when the cluster has one, else None."""
        return self._state.get("s3_endpoint")

    @property
    def s3_bucket(self) -> str | None:
        """A bucket created in moto_server at start, so `s3://clipforge/...` paths work at once."""
        return S3_BUCKET if self.s3_endpoint else None

    @property
    def temp_root(self) -> Path:
        """The folder holding every node's Ray temp dir (removed by `stop()`)."""
        return Path(self._state["temp_root"])

    def client_env(self) -> dict[str, str]:
        """Variables to add to a client process's environment: where the cluster is, and its S3 store."""
        env = {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "disabled"}
        if self.s3_endpoint:
            env.update(s3_env(self.s3_endpoint))
        return env

    # -- starting -----------------------------------------------------------------------------------------

    @classmethod
    def start(cls, root: str | Path, workers: int = 2, cpus_per_worker: int = 1, head_cpus: int = 0,
              s3: bool = False, object_store_mb: int = 512) -> "LocalCluster":
        """Start a head, `workers` worker nodes and (with `s3`) moto_server; return once all are up.

        On any failure (or Ctrl-C) everything started so far is stopped before the error is raised."""
        if workers < 0 or cpus_per_worker < 0 or head_cpus < 0 or object_store_mb < 80:
            raise LocalClusterError(f"workers ({workers}), cpus_per_worker ({cpus_per_worker}) and head_cpus "
                                    f"({head_cpus}) must be 0 or more, object_store_mb ({object_store_mb}) 80 or more")
        root = Path(root).absolute()
        ray_exe = _executable("ray", "install clipforge with the `cluster` extra (pip install 'clipforge[cluster]')")
        moto_exe = _executable("moto_server", "pip install 'moto[server]'") if s3 else None
        _clear_stale_state(root)
        (root / LOGS_DIR).mkdir(parents=True, exist_ok=True)
        cluster = cls(root, _new_state(ray_exe, object_store_mb))
        cluster._save()  # first: a start killed halfway can still be stopped with `load(root).stop()`
        try:
            if moto_exe:
                cluster._start_moto(moto_exe)
            cluster._start_node(HEAD, head_cpus, HEAD_START_TIMEOUT_S)
            for _ in range(workers):  # one at a time: see _start_node
                cluster.add_worker(cpus_per_worker)
        except BaseException:
            cluster._stop_after_failed_start()
            raise
        log.info("local Ray cluster up: head at %s (dashboard %s), %d worker node(s)", cluster.address,
                 cluster.dashboard_url, workers)
        return cluster

    @classmethod
    def load(cls, root: str | Path) -> "LocalCluster":
        """The cluster recorded in ROOT/cluster.json (started by this or another process)."""
        root = Path(root).absolute()
        path = root / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LocalClusterError(f"no local cluster in {root} (no {STATE_FILE} there); start one with "
                                    f"`clipforge cluster up --dir {root}`") from None
        except (OSError, ValueError) as e:
            raise LocalClusterError(f"{path}: cannot read the cluster's state: {e}") from None
        try:
            if state["version"] == _STATE_VERSION:
                return cls(root, state)
        except (KeyError, TypeError):
            pass
        raise LocalClusterError(f"{path}: not a cluster state file of this clipforge version; stop the cluster's "
                                "processes by hand and remove the file")

    def add_worker(self, cpus: int = 1, timeout_s: float = WORKER_START_TIMEOUT_S) -> str:
        """Start one more worker node with `cpus` CPUs; returns its name (`worker-3`) once Ray sees it alive."""
        numbers = [int(n.name.split("-")[1]) for n in self._nodes if n.name.startswith("worker-")]
        name = f"worker-{max(numbers, default=0) + 1}"  # never reused: Ray keeps dead nodes under their names
        self._start_node(name, cpus, timeout_s)
        return name

    def _start_moto(self, exe: str) -> None:
        port = _free_ports(1)[0]
        node = self._spawn("moto", [exe, "-H", "127.0.0.1", "-p", str(port)], cpus=0, temp_dir=None,
                           ports={"port": port}, env=self._env_for_nodes(self.temp_root / "moto-tmp"))
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        while not _accepts(port):
            if not self._leader_alive(node) or time.monotonic() > deadline:
                raise LocalClusterError(f"moto_server did not come up on port {port}; see {node.log}")
            time.sleep(_POLL_S / 2)
        _create_bucket(endpoint, S3_BUCKET, node.log)
        self._state["s3_endpoint"] = endpoint
        self._save()

    def _start_node(self, name: str, cpus: int, timeout_s: float) -> None:
        """Start node `name` and wait until it is up, starting it afresh if its process ends on the way.

        On a busy machine a raylet gives up when its dashboard agent (a Python process that imports much of Ray)
        takes more than Ray's fixed 15 s to report its port, and a port picked free may be taken before Ray binds
        it; both end `ray start` early, and a second try usually succeeds. Nodes start one after another for the
        same reason: each start is mostly Python imports competing for the same cores."""
        for attempt in range(1, START_ATTEMPTS + 1):
            node = self._launch(name, cpus, attempt)
            try:
                self._wait_up(node, timeout_s)
                return
            except _NodeEnded:
                self._keep_ray_logs(node)
                self._kill_node(node)
                if attempt == START_ATTEMPTS:
                    raise LocalClusterError(
                        f"node `{name}` did not come up: `ray start` ended {START_ATTEMPTS} times{_load_note()}; see "
                        f"{node.log} and Ray's logs in {self._ray_logs_copy(node)}") from None
                log.warning("node %s ended during start-up (see %s); starting it again", name, node.log)
                time.sleep(RETRY_PAUSE_S * attempt)  # let a burst of load on the machine pass
            except LocalClusterError:  # it did not come up in time
                self._keep_ray_logs(node)
                self._kill_node(node)
                raise
            except BaseException:
                self._kill_node(node)
                raise

    def _wait_up(self, node: _Node, timeout_s: float) -> None:
        """Wait until Ray reports `node` alive (and, for the head, its job server answers)."""
        what = "the head's job server" if node.name == HEAD else f"node `{node.name}`"
        deadline = time.monotonic() + timeout_s
        while not (node.name != HEAD or self._job_server_answers()) or not self._reported_alive(node.name):
            if not self._leader_alive(node):
                raise _NodeEnded(node.name)
            if time.monotonic() > deadline:
                raise LocalClusterError(f"{what} did not come up in {timeout_s:g} s; see {node.log} and Ray's "
                                        f"logs in {self._ray_logs_copy(node)}")
            time.sleep(_POLL_S)

    def _reported_alive(self, name: str) -> bool:
        try:
            record = self._ray_view().get(name)
        except LocalClusterError:
            return False  # the head's dashboard may not answer yet
        return record is not None and record.get("state") == "ALIVE"

    def _launch(self, name: str, cpus: int, attempt: int) -> _Node:
        """Start node `name`'s `ray start` (with ports of its own) and return at once."""
        if name == HEAD:
            ports = dict(zip(_HEAD_PORTS + _NODE_PORTS, _free_ports(len(_HEAD_PORTS) + len(_NODE_PORTS))))
            self._state["address"] = f"127.0.0.1:{ports['port']}"
            self._state["dashboard_url"] = f"http://127.0.0.1:{ports['dashboard-port']}"
            role_args = ["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
        else:
            ports = dict(zip(_NODE_PORTS, _free_ports(len(_NODE_PORTS))))
            role_args = [f"--address={self.address}"]
        temp_dir = self.temp_root / name
        shutil.rmtree(temp_dir, ignore_errors=True)  # an earlier attempt's
        temp_dir.mkdir()
        cmd = [self._state["ray"], "start", "--block", "--node-ip-address=127.0.0.1", f"--node-name={name}",
               f"--num-cpus={cpus}", "--num-gpus=0",  # nodes sharing one machine must not all claim its GPUs
               f"--resources={json.dumps({node_resource(name): 1})}", f"--temp-dir={temp_dir}",
               f"--object-store-memory={self._state['object_store_mb'] * 2**20}",
               "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
               *role_args, *[f"--{option}={port}" for option, port in ports.items()]]
        return self._spawn(name, cmd, cpus, str(temp_dir), ports, self._env_for_nodes(temp_dir / "tmp"), attempt)

    def _env_for_nodes(self, scratch: Path) -> dict[str, str]:
        """The environment of a node's processes; `scratch` becomes their TMPDIR."""
        scratch.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_NODES}
        env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    # Temporary files of the cluster's processes (Python's multiprocessing leaves pymp-* folders
                    # behind a killed process) stay inside the cluster's temp dir, which `stop()` removes.
                    "TMPDIR": str(scratch),
                    # A node stops only when the whole cluster does: nothing to drain first (Ray waits 30 s).
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                    # Job entrypoints run `python` and `clipforge`: they must be this environment's.
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
        if self.s3_endpoint:  # jobs and their tasks reach the cluster's store without further setup
            env.update(s3_env(self.s3_endpoint))
        return env

    def _spawn(self, name: str, cmd: list[str], cpus: int, temp_dir: str | None, ports: dict[str, int],
               env: dict[str, str], attempt: int = 1) -> _Node:
        """Start one node's process in a session of its own (Ctrl-C in the terminal does not reach it, and the
        session id finds its processes) and record it before anything else can fail."""
        token = f"{self._state['id']}:{name}"
        log_path = self.root / LOGS_DIR / f"{name}.log"
        with open(log_path, "w" if attempt == 1 else "a") as out:
            if attempt > 1:
                out.write(f"\n--- {name}: start attempt {attempt} ---\n")
                out.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**env, TOKEN_VAR: token}, cwd=temp_dir or str(self.temp_root),
                                    start_new_session=True)
        stat = read_stat(proc.pid)
        node = _Node(name=name, cpus=cpus, temp_dir=temp_dir, log=str(log_path), token=token, pid=proc.pid,
                     start_ticks=stat.start_ticks if stat else None, ports=ports)
        self._children[name] = proc
        if name == "moto":
            self._moto = node
        else:
            self._nodes = [n for n in self._nodes if n.name != name] + [node]  # replaces a failed attempt
        self._save()
        return node

    # -- waiting --------------------------------------------------------------------------------------------

    def _job_server_answers(self) -> bool:
        try:
            _http_json(f"{self.dashboard_url}/api/jobs/")
            return True
        except (OSError, ValueError):
            return False

    def wait_for_node(self, name: str, alive: bool = True, timeout_s: float = WORKER_START_TIMEOUT_S) -> NodeInfo:
        """Wait until Ray reports node `name` alive (or, with alive=False, dead: after a kill, Ray needs its health
        checks to fail first, which takes 15 s or more); returns the node as Ray then reports it."""
        node = self._node(name)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                record = self._ray_view().get(name)
            except LocalClusterError:
                record = None  # the head's dashboard may not answer yet
            if record is not None and (record.get("state") == "ALIVE") == alive:
                return self._info(node, record)
            if time.monotonic() > deadline:
                raise LocalClusterError(f"node `{name}` is not {'alive' if alive else 'dead'} in Ray's view after "
                                        f"{timeout_s:g} s; see {node.log}")
            time.sleep(_POLL_S)

    def _ray_logs_copy(self, node: _Node) -> Path:
        return self.root / LOGS_DIR / f"{node.name}-ray"

    def _keep_ray_logs(self, node: _Node) -> None:
        """Copy a node's Ray logs next to its `ray start` log: its temp dir goes when the cluster stops."""
        if node.temp_dir is not None:
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(Path(node.temp_dir) / "session_latest" / "logs", self._ray_logs_copy(node),
                                dirs_exist_ok=True)

    # -- looking --------------------------------------------------------------------------------------------

    def _ray_view(self) -> dict[str, dict[str, Any]]:
        """{node name: Ray's node record} from the head's state API; an alive record wins over a dead one."""
        url = f"{self.dashboard_url}/api/v0/nodes?limit=10000&detail=true&timeout=30"
        try:
            reply = _http_json(url)
            records = reply["data"]["result"]["result"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LocalClusterError(f"cannot reach the cluster's head at {self.dashboard_url} ({e}); see "
                                    f"{self._node(HEAD).log}") from None
        view: dict[str, dict[str, Any]] = {}
        for record in records:
            name = record.get("node_name")
            if name not in view or record.get("state") == "ALIVE":
                view[name] = record
        return view

    def _info(self, node: _Node, record: dict[str, Any] | None) -> NodeInfo:
        record = record or {}
        resources = {name: float(amount) for name, amount in (record.get("resources_total") or {}).items()}
        return NodeInfo(name=node.name, node_id=record.get("node_id"), alive=record.get("state") == "ALIVE",
                        cpus=resources.get("CPU", 0.0), pids=self.pids(node.name), resources=resources)

    def nodes(self) -> list[NodeInfo]:
        """Every node started (killed ones included), in start order, as Ray and /proc see it now."""
        view = self._ray_view()
        return [self._info(node, view.get(node.name)) for node in self._nodes]

    def names(self) -> list[str]:
        """The names of the nodes started, head first (killed ones included)."""
        return [node.name for node in self._nodes]

    def pids(self, name: str) -> list[int]:
        """The pids of node `name`'s processes (`moto` for moto_server) alive now."""
        return NodeTracker(self._mark(self._node(name))).alive()

    def all_pids(self) -> list[int]:
        """Every process of the cluster alive now (moto_server's included)."""
        return sorted({pid for node in self._tracked() for pid in NodeTracker(self._mark(node)).alive()})

    # -- stopping -------------------------------------------------------------------------------------------

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL every process of worker node `name` (its `ray start`, raylet, agents and workers); returns
        their pids. Ray then reports the node dead after its health checks fail (`wait_for_node(name, False)`)."""
        node = self._node(name)
        if not name.startswith("worker-"):
            raise LocalClusterError(f"`{name}` is not a worker node; stop the whole cluster with stop()")
        return self._kill_node(node)

    def _kill_node(self, node: _Node) -> list[int]:
        pids = kill_all([NodeTracker(self._mark(node))])
        self._reap(node.name)
        node.killed = True
        self._save()
        return pids

    def stop(self) -> list[int]:
        """Stop every process of the cluster (moto_server's too), remove its temp dirs and state file; keep
        ROOT/logs and anything else in ROOT. Returns the pids that were running."""
        trackers = [NodeTracker(self._mark(node)) for node in self._tracked()]
        running = {pid for tracker in trackers for pid in tracker.alive()}  # known before any parent ends
        leaders = [(node.pid, node.start_ticks) for node in self._tracked() if self._leader_alive(node)]
        for pid, start in leaders:
            terminate(pid, start)  # `ray start --block` stops its node's processes on SIGTERM
        if not wait_gone(leaders, STOP_GRACE_S):
            log.info("local cluster: processes left after %g s are killed", STOP_GRACE_S)
        killed = kill_all(trackers)
        for name in list(self._children):
            self._reap(name)
        self._remove_temp_root()
        with contextlib.suppress(FileNotFoundError):
            (self.root / STATE_FILE).unlink()
        return sorted(running | set(killed))

    def _stop_after_failed_start(self) -> None:
        try:
            self.stop()
        except Exception:  # the start's own error is the one to report; this one is only logged
            log.exception("stopping the local cluster in %s after its failed start", self.root)

    def _reap(self, name: str) -> None:
        proc = self._children.pop(name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def _remove_temp_root(self) -> None:
        marker = self.temp_root / _TEMP_MARKER
        try:
            ours = marker.read_text().strip() == self._state["id"]
        except OSError:
            ours = False
        if ours:
            shutil.rmtree(self.temp_root, ignore_errors=True)
        elif self.temp_root.exists():
            log.warning("%s does not hold this cluster's marker; left in place", self.temp_root)

    # -- bookkeeping ----------------------------------------------------------------------------------------

    def _node(self, name: str) -> _Node:
        if name == "moto" and self._moto is not None:
            return self._moto
        for node in self._nodes:
            if node.name == name:
                return node
        raise LocalClusterError(f"no node `{name}` in the local cluster in {self.root} "
                                f"(nodes: {', '.join(self.names()) or 'none'})")

    def _tracked(self) -> Iterator[_Node]:
        yield from self._nodes
        if self._moto is not None:
            yield self._moto

    def _mark(self, node: _Node) -> NodeMark:
        return node.mark(self._leaders_valid)

    def _leader_alive(self, node: _Node) -> bool:
        if not self._leaders_valid:
            return False
        stat = read_stat(node.pid)
        return stat is not None and stat.start_ticks == node.start_ticks

    def _save(self) -> None:
        self._state["nodes"] = [asdict(node) for node in self._nodes]
        self._state["moto"] = asdict(self._moto) if self._moto else None
        path = self.root / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(self._state, indent=2) + "\n")
        tmp.replace(path)  # whole or not at all: `load()` from another process never sees half a file


def _new_state(ray_exe: str, object_store_mb: int) -> dict[str, Any]:
    cluster_id = uuid.uuid4().hex
    temp_root = tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=_TEMP_PARENT)
    Path(temp_root, _TEMP_MARKER).write_text(cluster_id + "\n")
    return {"version": _STATE_VERSION, "id": cluster_id, "host": _host_identity(), "ray": ray_exe,
            "temp_root": temp_root, "object_store_mb": object_store_mb, "address": None, "dashboard_url": None,
            "s3_endpoint": None, "nodes": [], "moto": None}


def _clear_stale_state(root: Path) -> None:
    """Refuse to start over a running cluster; forget one whose processes have all ended (e.g. a reboot)."""
    if not (root / STATE_FILE).exists():
        return
    old = LocalCluster.load(root)
    running = old.all_pids()
    if running:
        raise LocalClusterError(f"a local cluster already runs from {root} ({len(running)} processes, head "
                                f"{old.address}); stop it first: clipforge cluster down --dir {root}")
    log.info("forgetting the stopped local cluster recorded in %s", root / STATE_FILE)
    old.stop()


def _load_note() -> str:
    """What the machine's load says about a node that gave up starting (its agents were too slow to start)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    if load < 2 * cores:
        return ""
    return (f" (this machine is busy: load average {load:.0f} on {cores} cores, and a raylet gives up when its "
            "agents take more than 15 s to start; try again when it is less busy)")


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _create_bucket(endpoint: str, bucket: str, log_path: str) -> None:
    # moto does not check signatures: a plain path-style PUT creates the bucket.
    request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S):
            pass
    except (OSError, urllib.error.HTTPError) as e:
        raise LocalClusterError(f"moto_server at {endpoint} did not create bucket `{bucket}` ({e}); see "
                                f"{log_path}") from None
