"""`clipforge render kuberay`: the RayJob manifest against the fields and types of KubeRay's ray.io/v1 API."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipforge.cluster.kuberay import SPEC_ENV, KubeRayError, KubeRayOptions, dns1123_name, manifest_yaml, render_rayjob
from clipforge.cluster.specs import load_spec, validate_spec

REPO = Path(__file__).resolve().parents[2]


# ---- A compact schema of the RayJob CRD (KubeRay ray.io/v1) and the parts of core/v1 it embeds. ----
# A dict maps each allowed field to its type: a Python type (or tuple), a nested dict, [item schema] for
# lists, or MapOf(value type) for map[string]T. REQUIRED lists the fields without `omitempty` in the Go types.


class MapOf:
    def __init__(self, value):
        self.value = value


REQUIRED = "__required__"
QUANTITY = (str, int, float)
STR_MAP = MapOf(str)

OBJECT_META = {"name": str, "namespace": str, "labels": STR_MAP, "annotations": STR_MAP, "generateName": str}
RESOURCES = {"requests": MapOf(QUANTITY), "limits": MapOf(QUANTITY), "claims": [{"name": str}]}
CONTAINER = {
    REQUIRED: ["name"],
    "name": str, "image": str, "imagePullPolicy": str, "command": [str], "args": [str], "workingDir": str,
    "env": [{"name": str, "value": str, "valueFrom": dict}], "envFrom": [dict],
    "ports": [{REQUIRED: ["containerPort"], "containerPort": int, "name": str, "protocol": str,
               "hostPort": int, "hostIP": str}],
    "resources": RESOURCES, "volumeMounts": [{"name": str, "mountPath": str, "readOnly": bool, "subPath": str}],
    "lifecycle": dict, "livenessProbe": dict, "readinessProbe": dict, "startupProbe": dict,
    "securityContext": dict, "stdin": bool, "tty": bool,
}
POD_TEMPLATE = {
    "metadata": OBJECT_META,
    "spec": {
        REQUIRED: ["containers"],
        "containers": [CONTAINER], "initContainers": [CONTAINER], "volumes": [dict], "nodeSelector": STR_MAP,
        "tolerations": [dict], "affinity": dict, "serviceAccountName": str, "restartPolicy": str,
        "imagePullSecrets": [{"name": str}], "securityContext": dict, "priorityClassName": str,
        "schedulerName": str, "terminationGracePeriodSeconds": int, "hostNetwork": bool,
    },
}
HEAD_GROUP = {
    REQUIRED: ["rayStartParams", "template"],
    "serviceType": str, "headService": dict, "enableIngress": bool, "rayStartParams": STR_MAP,
    "template": POD_TEMPLATE,
}
WORKER_GROUP = {
    REQUIRED: ["groupName", "rayStartParams", "template"],
    "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "idleTimeoutSeconds": int,
    "numOfHosts": int, "suspend": bool, "rayStartParams": STR_MAP, "template": POD_TEMPLATE,
    "scaleStrategy": {"workersToDelete": [str]},
}
RAY_CLUSTER_SPEC = {
    REQUIRED: ["headGroupSpec"],
    "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": [WORKER_GROUP], "rayVersion": str,
    "enableInTreeAutoscaling": bool, "autoscalerOptions": dict, "headServiceAnnotations": STR_MAP,
    "suspend": bool, "managedBy": str, "gcsFaultToleranceOptions": dict,
}
RAYJOB_SPEC = {
    "activeDeadlineSeconds": int, "backoffLimit": int, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": POD_TEMPLATE, "metadata": STR_MAP, "clusterSelector": STR_MAP,
    "submitterConfig": {"backoffLimit": int}, "managedBy": str, "deletionStrategy": dict,
    "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "submissionMode": str,
    "entrypointResources": str, "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float),
    "ttlSecondsAfterFinished": int, "shutdownAfterJobFinishes": bool, "suspend": bool,
}
RAYJOB = {
    REQUIRED: ["apiVersion", "kind", "metadata", "spec"],
    "apiVersion": str, "kind": str, "metadata": {REQUIRED: ["name"], **OBJECT_META}, "spec": RAYJOB_SPEC,
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _type_ok(value, expected) -> bool:
    if isinstance(value, bool) and expected is not bool and (
            not isinstance(expected, tuple) or bool not in expected):
        return False  # YAML booleans are not integers to Kubernetes
    return isinstance(value, expected)


def schema_errors(value, schema, path: str = "") -> list[str]:
    """Every misspelt, missing or mistyped field of `value` under `schema`, as 'path: problem' lines."""
    where = path or "(root)"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        errors = [f"{path}.{k}".lstrip(".") + ": required field is missing"
                  for k in schema.get(REQUIRED, []) if k not in value]
        for k, v in value.items():
            sub = f"{path}.{k}".lstrip(".")
            if k == REQUIRED or k not in schema:
                errors.append(f"{sub}: unknown field")
            else:
                errors.extend(schema_errors(v, schema[k], sub))
        return errors
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, schema[0], f"{path}[{i}]")]
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in schema_errors(v, schema.value, f"{path}[{k}]")]
    if not _type_ok(value, schema):
        return [f"{where}: expected {getattr(schema, '__name__', schema)}, got {type(value).__name__} {value!r}"]
    return []


# ---- Specs ----

TRAIN = """\
kind: train
name: "{name}"
storage: s3://bucket/runs/t
model: {{name: tiny}}
data: {{shards: ["s3://bucket/shards/{{00000..00009}}.tar"], batch_size: 48}}
scaling: {{workers: {workers}, cpus_per_worker: {cpus}, gpus_per_worker: {gpus}}}
ray:
  runtime_env:
    pip: [einops]
    env_vars: {{NCCL_DEBUG: WARN}}
"""


def train_spec(tmp_path: Path, name="CLIP ViT-B/32 on LAION_400M (run #3)", workers=8, cpus=4, gpus=1,
               overrides=None):
    p = tmp_path / "train.yaml"
    p.write_text(TRAIN.format(name=name, workers=workers, cpus=cpus, gpus=gpus))
    return p, load_spec(p, overrides or [])


def rendered(tmp_path, **kw) -> dict:
    _, spec = train_spec(tmp_path, **kw)
    # Through the YAML text, as kubectl would read it.
    return yaml.safe_load(manifest_yaml(render_rayjob(spec, KubeRayOptions(image="reg.example/clipforge:1"))))


def test_rendered_rayjob_matches_the_crd_schema(tmp_path):
    m = rendered(tmp_path)
    assert schema_errors(m, RAYJOB) == []
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    s = m["spec"]
    assert s["shutdownAfterJobFinishes"] is True
    assert s["submissionMode"] in SUBMISSION_MODES
    assert s["ttlSecondsAfterFinished"] >= 0 and s["backoffLimit"] >= 0
    head = s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "reg.example/clipforge:1"
    assert head["resources"]["requests"] == head["resources"]["limits"]


def test_validator_rejects_a_misspelt_field(tmp_path):
    m = rendered(tmp_path)
    m["spec"]["shutdownAfterJobFinish"] = m["spec"].pop("shutdownAfterJobFinishes")
    m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    errors = schema_errors(m, RAYJOB)
    assert "spec.shutdownAfterJobFinish: unknown field" in errors
    assert "spec.rayClusterSpec.workerGroupSpecs[0].maxReplica: unknown field" in errors


def test_validator_rejects_wrong_types_and_missing_fields(tmp_path):
    m = rendered(tmp_path)
    group = m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replicas"] = "8"
    group["rayStartParams"]["num-cpus"] = 4
    m["spec"]["shutdownAfterJobFinishes"] = "true"
    m["spec"]["backoffLimit"] = True
    del m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    errors = "\n".join(schema_errors(m, RAYJOB))
    assert "workerGroupSpecs[0].replicas: expected int, got str" in errors
    assert "rayStartParams[num-cpus]: expected str, got int" in errors
    assert "spec.shutdownAfterJobFinishes: expected bool, got str" in errors
    assert "spec.backoffLimit: expected int, got bool" in errors
    assert "headGroupSpec.template: required field is missing" in errors


def test_worker_group_is_sized_from_scaling(tmp_path):
    group = rendered(tmp_path, workers=8, cpus=4, gpus=1)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(group) == 1
    g = group[0]
    assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == 8
    res = g["template"]["spec"]["containers"][0]["resources"]
    for part in ("requests", "limits"):
        assert res[part]["cpu"] == "4"
        assert res[part]["nvidia.com/gpu"] == "1"
        assert re.fullmatch(r"\d+Gi", res[part]["memory"]) and int(res[part]["memory"][:-2]) >= 4
    assert g["rayStartParams"]["num-cpus"] == "4" and g["rayStartParams"]["num-gpus"] == "1"


@pytest.mark.parametrize(
    "workers, cpus, gpus, replicas, pod_cpu, pod_gpu",
    [
        (3, 0.5, 0, 2, "1", None),     # two half-CPU workers share a 1-CPU pod; the third gets its own
        (4, 0.25, 0, 1, "1", None),
        (2, 1.5, 0, 2, "2", None),     # no pod splits a CPU: 1.5 rounds up
        (4, 2, 0.5, 2, "4", "1"),      # two half-GPU workers share one GPU (and bring their CPUs)
        (1, 0.5, 0, 1, "1", None),
    ],
)
def test_fractional_workers_are_packed_without_splitting_units(tmp_path, workers, cpus, gpus, replicas, pod_cpu,
                                                                pod_gpu):
    g = rendered(tmp_path, workers=workers, cpus=cpus, gpus=gpus)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert g["replicas"] == replicas
    assert limits["cpu"] == pod_cpu
    assert limits.get("nvidia.com/gpu") == pod_gpu
    # The pods together hold at least what the spec's workers reserve.
    assert replicas * float(pod_cpu) >= workers * cpus
    assert replicas * float(pod_gpu or 0) >= workers * gpus


def test_runtime_env_yaml_carries_the_spec_and_its_runtime_env(tmp_path):
    path, spec = train_spec(tmp_path)
    m = rendered(tmp_path)
    env = yaml.safe_load(m["spec"]["runtimeEnvYAML"])
    assert env["pip"] == ["einops"]
    assert env["env_vars"]["NCCL_DEBUG"] == "WARN"
    carried = validate_spec(yaml.safe_load(env["env_vars"][SPEC_ENV]))
    # The job joins the RayJob's cluster (whose runtime_env it already has); everything else is the spec.
    assert carried.ray.address is None and carried.ray.runtime_env == {}
    assert carried.model_dump(exclude={"ray"}) == spec.model_dump(exclude={"ray"})
    assert m["spec"]["entrypoint"].split()[:3] == ["python", "-m", "clipforge.cli.kuberay_job"]


def test_metadata_name_is_a_dns1123_name(tmp_path):
    m = rendered(tmp_path)
    assert m["metadata"]["name"] == "clip-vit-b-32-on-laion-400m-run-3"
    long = dns1123_name("Run_" + "x" * 100 + "--!")
    assert len(long) <= 63
    for name in (long, dns1123_name("---"), dns1123_name("ÄÖÜ job"), dns1123_name("a" * 62 + "-b")):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


def test_local_working_dir_is_refused(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("kind: build\ninput: {path: s3://b/urls.parquet}\noutput: {path: s3://b/shards}\n"
                 "ray: {runtime_env: {working_dir: ./code}}\n")
    with pytest.raises(KubeRayError, match="working_dir './code' is a local folder"):
        render_rayjob(load_spec(p))
    ok = load_spec(p, ["ray.runtime_env.working_dir=s3://b/code.zip"])
    env = yaml.safe_load(render_rayjob(ok)["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "s3://b/code.zip"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clipforge", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)


def test_render_command_prints_the_manifest(tmp_path):
    path, _ = train_spec(tmp_path, workers=2, cpus=1, gpus=0)
    r = _cli("render", "kuberay", str(path), "scaling.workers=4", "--image", "me/clipforge:dev", "--ttl", "60")
    assert r.returncode == 0, r.stderr
    m = yaml.safe_load(r.stdout)
    assert schema_errors(m, RAYJOB) == []
    assert m["spec"]["ttlSecondsAfterFinished"] == 60
    assert m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4
    assert m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == \
        "me/clipforge:dev"


def test_render_command_errors_are_one_line(tmp_path):
    path, _ = train_spec(tmp_path)
    r = _cli("render", "kuberay", str(path), "scaling.workers=0")
    assert r.returncode == 2
    assert "field `scaling.workers`" in r.stderr and "Traceback" not in r.stderr
    r = _cli("render", "kuberay", str(path), "ray.runtime_env.working_dir=.")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "local folder" in r.stderr and "Traceback" not in r.stderr


def test_entrypoint_runs_the_carried_spec_through_clipforge_run(tmp_path):
    _, spec = train_spec(tmp_path)
    carried = yaml.safe_load(yaml.safe_load(render_rayjob(spec)["spec"]["runtimeEnvYAML"])["env_vars"][SPEC_ENV])
    carried["optim"]["lr"] = -1.0  # `clipforge run` validates before running anything
    env = {**os.environ, SPEC_ENV: yaml.safe_dump(carried)}
    r = subprocess.run([sys.executable, "-m", "clipforge.cli.kuberay_job"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert "field `optim.lr`" in r.stderr and "Traceback" not in r.stderr
    env.pop(SPEC_ENV)
    r = subprocess.run([sys.executable, "-m", "clipforge.cli.kuberay_job"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2 and SPEC_ENV in r.stderr
