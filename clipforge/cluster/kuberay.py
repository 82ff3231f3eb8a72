"""A job spec as a KubeRay `RayJob` manifest: one Kubernetes object that creates a Ray cluster
sized from the spec's `scaling`, runs the job on it and deletes the cluster afterwards.

The spec travels inside the manifest (an env var of the job's runtime_env), because a RayJob
cannot upload local files; `python -m clipforge.cli.kuberay_job` is the job's entrypoint: it
writes that spec to a file and hands it to `clipforge run`.
"""
from __future__ import annotations

import copy
import json
import math
import re
from typing import Any, Literal

import yaml
from pydantic import Field

from clipforge import __version__
from clipforge.cluster.spec_paths import is_local, spec_paths
from clipforge.errors import UserError
from clipforge.specbase import RayInit, Scaling, Spec

SPEC_ENV = "CLIPFORGE_SPEC_YAML"
ENTRYPOINT = "python -m clipforge.cli.kuberay_job"
DNS1123_MAX = 63


class KubeRayError(UserError):
    """A spec that cannot be expressed as a RayJob (e.g. a local working_dir)."""


class KubeRayOptions(Spec):
    """Cluster-side settings that are not part of a job spec (they depend on the Kubernetes cluster)."""

    image: str = Field(f"clipforge:{__version__}", description="Container image with clipforge installed.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    namespace: str | None = Field(None, description="metadata.namespace (None: kubectl's current namespace).")
    head_cpus: int = Field(2, ge=0, description="CPUs of the head pod; the job's driver runs there.")
    head_memory_gib: int = Field(8, ge=1, description="Memory of the head pod in GiB.")
    memory_gib_per_cpu: float = Field(4.0, gt=0, description="Worker pod memory per CPU, in GiB.")
    min_worker_memory_gib: int = Field(4, ge=1, description="Lower bound of a worker pod's memory in GiB.")
    ttl_seconds_after_finished: int = Field(600, ge=0, description="Keep the finished cluster this long (logs).")
    backoff_limit: int = Field(0, ge=0, description="Retries of a failed job, each on a fresh cluster.")
    submission_mode: Literal["K8sJobMode", "HTTPMode"] = "K8sJobMode"
    active_deadline_seconds: int | None = Field(None, ge=1, description="Stop the job after this long.")


class WorkerSizing(Spec):
    """How `scaling.workers` Ray workers map onto identical pods."""

    workers_per_pod: int
    replicas: int
    cpus: int
    gpus: int
    resources: dict[str, float]


def dns1123_name(text: str, max_len: int = DNS1123_MAX) -> str:
    """A valid Kubernetes object name (lower-case alphanumerics and '-', starting and ending alphanumeric)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")[:max_len].rstrip("-")
    return name or "clipforge-job"


def _packing(per_worker: float) -> int:
    """Workers of this size that fit in one unit (a CPU or a GPU); 1 for whole-unit workers."""
    return max(1, math.floor(1 / per_worker + 1e-9)) if 0 < per_worker < 1 else 1


def size_workers(scaling: Scaling) -> WorkerSizing:
    """Pods for the workers. Kubernetes and Ray count whole CPUs/GPUs per node, so workers with a fraction of
    a unit are packed several to a pod (0.5 CPU -> two per 1-CPU pod) and a remainder is rounded up
    (1.5 CPU -> 2). GPUs decide the packing when a worker has any: half-GPU workers pair up on one GPU (their
    CPUs add up), whole-GPU workers get a pod each."""
    gpus = scaling.gpus_per_worker
    per_pod = _packing(gpus) if gpus > 0 else _packing(scaling.cpus_per_worker)
    per_pod = min(per_pod, scaling.workers)
    return WorkerSizing(
        workers_per_pod=per_pod,
        replicas=math.ceil(scaling.workers / per_pod),
        cpus=max(1, math.ceil(per_pod * scaling.cpus_per_worker - 1e-9)),
        gpus=math.ceil(per_pod * gpus - 1e-9),
        resources={k: v * per_pod for k, v in scaling.resources.items()},
    )


def _quantity_gib(gib: float) -> str:
    return f"{math.ceil(gib)}Gi"


def _container(name: str, image: str, pull: str, cpus: int, memory: str, gpus: int, ports: list[dict]) -> dict:
    amounts: dict[str, str] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": pull,
        # Requests equal limits: Ray schedules by the numbers it is given, so the pod must really have them.
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
    }
    if ports:
        container["ports"] = ports
    return container


def _check_no_local_uploads(runtime_env: dict) -> None:
    """A RayJob's runtime_env is used inside the cluster, where the submitting machine's folders do not exist."""
    wd = runtime_env.get("working_dir")
    if wd is not None and "://" not in str(wd):
        raise KubeRayError(
            f"ray.runtime_env.working_dir {wd!r} is a local folder; a RayJob cannot upload it. "
            "Use a remote URI (s3://bucket/code.zip, https://.../code.zip) or bake the code into the image"
        )
    for mod in runtime_env.get("py_modules") or []:
        if "://" not in str(mod):
            raise KubeRayError(
                f"ray.runtime_env.py_modules entry {mod!r} is a local path; a RayJob cannot upload it. "
                "Use a remote URI or install the module in the image"
            )


def local_path_warnings(spec) -> list[str]:
    """One warning line per local path of a job spec. A RayJob always runs on several pods (a head and at least
    one worker pod), on the cluster's machines: a path on this machine's disk is not there, and a folder that
    each pod writes locally ends up split across pods."""
    replicas = size_workers(spec.scaling).replicas
    pods = f"{replicas + 1} pods (a head and {replicas} worker pod{'s' if replicas > 1 else ''})"
    return [f"warning: field `{p.field}`: {p.path} is a local path, but the RayJob runs on {pods} on the cluster's "
            "machines, which cannot see this machine's files: give an s3:// path or another store every pod can "
            "reach (or a path that a volume mounted in every pod provides)"
            for p in spec_paths(spec) if is_local(p.path)]


def _literal_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line strings (runtimeEnvYAML) read best as YAML block scalars.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


class _ManifestDumper(yaml.SafeDumper):
    pass


_ManifestDumper.add_representer(str, _literal_str)


def cluster_spec_text(spec) -> str:
    """The spec as a job on a cluster runs it: it joins the cluster it runs on, and its runtime_env has become
    the whole job's (a RayJob's runtimeEnvYAML, a submitted job's runtime_env)."""
    from clipforge.runtime.run_dir import dump_spec

    return dump_spec(spec.model_copy(update={"ray": RayInit()}))


def runtime_env_for(spec) -> dict:
    runtime_env = copy.deepcopy(spec.ray.runtime_env)
    _check_no_local_uploads(runtime_env)
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    env_vars[SPEC_ENV] = cluster_spec_text(spec)
    runtime_env["env_vars"] = env_vars
    return runtime_env


def render_rayjob(spec, options: KubeRayOptions | None = None) -> dict:
    """The RayJob manifest of a validated job spec, as a dict ready for `yaml.safe_dump`."""
    import ray

    opts = options or KubeRayOptions()
    sizing = size_workers(spec.scaling)
    name = dns1123_name(spec.name)
    labels = {"app.kubernetes.io/name": "clipforge", "app.kubernetes.io/version": __version__,
              "clipforge.io/kind": spec.kind}
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if opts.namespace:
        metadata["namespace"] = opts.namespace

    head_ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": str(opts.head_cpus)},
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {"containers": [_container("ray-head", opts.image, opts.image_pull_policy, max(1, opts.head_cpus),
                                               f"{opts.head_memory_gib}Gi", 0, head_ports)]},
        },
    }
    worker_params = {"num-cpus": str(sizing.cpus)}
    if sizing.gpus:
        worker_params["num-gpus"] = str(sizing.gpus)
    if sizing.resources:
        # KubeRay passes the value to `ray start --resources` through a shell, hence the inner quotes.
        worker_params["resources"] = "'" + json.dumps(sizing.resources, sort_keys=True) + "'"
    memory = _quantity_gib(max(opts.min_worker_memory_gib, sizing.cpus * opts.memory_gib_per_cpu))
    worker = {
        "groupName": "workers",
        "replicas": sizing.replicas,
        "minReplicas": sizing.replicas,
        "maxReplicas": sizing.replicas,
        "rayStartParams": worker_params,
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {"containers": [_container("ray-worker", opts.image, opts.image_pull_policy, sizing.cpus,
                                               memory, sizing.gpus, [])]},
        },
    }
    job_spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "runtimeEnvYAML": manifest_yaml(runtime_env_for(spec)),
        "metadata": {"clipforge.kind": spec.kind, "clipforge.name": spec.name, "clipforge.version": __version__},
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_seconds_after_finished,
        "backoffLimit": opts.backoff_limit,
        "submissionMode": opts.submission_mode,
        "rayClusterSpec": {
            "rayVersion": ray.__version__,
            "enableInTreeAutoscaling": False,
            "headGroupSpec": head,
            "workerGroupSpecs": [worker],
        },
    }
    if opts.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = opts.active_deadline_seconds
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": job_spec}


def manifest_yaml(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=120)
