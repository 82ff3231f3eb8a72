"""The deployment files: the Dockerfile passes hadolint, the cluster-launcher YAML passes yamllint and
Ray's own cluster-config schema, and both agree with the package on versions."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
LAUNCHER = INFRA / "ray-cluster-aws.yaml"
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 120}}}"


def _tool(name: str) -> str:
    """A linter installed with the test extra (next to this Python), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"`{name}` is not installed (pip install '.[test]' installs it)")
    return found


def test_dockerfile_passes_hadolint():
    r = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nRUN pip install requests\n")
    r = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "DL3006" in r.stdout  # untagged base image


def test_launcher_yaml_passes_yamllint():
    pytest.importorskip("yamllint", reason="yamllint is not installed (pip install '.[test]')")
    from yamllint import config, linter

    conf = config.YamlLintConfig(YAMLLINT_CONFIG)
    problems = [f"{LAUNCHER.name}:{p.line}:{p.column} {p.level} {p.desc} ({p.rule})"
                for p in linter.run(LAUNCHER.read_text(), conf, str(LAUNCHER))]
    assert problems == [], "\n".join(problems)


def test_yamllint_would_catch_a_bad_launcher_yaml():
    pytest.importorskip("yamllint", reason="yamllint is not installed (pip install '.[test]')")
    from yamllint import config, linter

    bad = "cluster_name: x\nprovider:\n    type: aws\n  region: us-west-2\nauth: {ssh_user: ubuntu}\n"
    assert list(linter.run(bad, config.YamlLintConfig(YAMLLINT_CONFIG)))


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_yaml_matches_rays_cluster_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_launcher(), schema)


def test_launcher_yaml_has_what_the_aws_launcher_needs():
    cfg = _launcher()
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["auth"]["ssh_user"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        assert "resources" in node and node["node_config"]["InstanceType"], name
    workers = [n for n in types if n != cfg["head_node_type"]]
    assert workers and all(types[n]["max_workers"] <= cfg["max_workers"] for n in workers)
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    # The dashboard (job server) must not be exposed on a public interface.
    assert not any("dashboard-host=0.0.0.0" in c for c in cfg["head_start_ray_commands"])
    setup = " ".join(cfg["setup_commands"])
    assert "ray[default]" in setup and "~/clipforge" in setup
    assert cfg["file_mounts"]["/home/ubuntu/clipforge"] == "."


def test_versions_agree_with_the_package():
    import ray

    import clipforge

    docker = DOCKERFILE.read_text()
    launcher = LAUNCHER.read_text()
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"torch==([\w.+]+)", makefile).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in docker
    assert f'"torch=={torch_pin}"' in launcher
    assert f"ARG RAY_VERSION={ray.__version__}" in docker
    assert f"ray[default]=={ray.__version__}" in launcher
    assert f"clipforge:{clipforge.__version__}" in docker
