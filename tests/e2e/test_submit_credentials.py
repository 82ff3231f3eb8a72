"""`clipforge submit` hands a job this shell's object-store settings without any listing showing them.

The cluster is a real Ray head on 127.0.0.1 whose processes have no object-store settings of their own
(`bare_head`); S3 is moto. A build job writes its shards to s3:// with the client's settings only, and the
secret values are then looked for in every listing the cluster serves: the job API, the state API (tasks,
actors, workers, runtime envs, nodes, placement groups), the dashboard's own views (as an API client and as
a browser, which Ray 2.60 answers with env_vars redacted), every log file on the head, and the output of
`clipforge jobs list|status|logs`.
"""
from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest
import requests

from clipforge.cluster.specs import load_spec
from clipforge.cluster.submit import forwarded_settings, staged_job
from clipforge.runtime import remote_env
from clipforge.runtime.job_credentials import (
    CREDENTIALS_FILE,
    WORKER_SETUP_HOOK,
    JobCredentialsError,
    apply_credentials_file,
    client_settings,
)
from clipforge.runtime.remote_env import FORWARDED_VARIABLES

import ray_cluster
from http_fixtures import ImageServer
from ray_cluster import cli
from s3_server import REGION, new_bucket, s3fs_for

# Files the client names for botocore: they must never be read on, or forwarded to, the cluster.
CLIENT_PATH_VARIABLES = ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0"}


def no_aws(env: dict[str, str]) -> dict[str, str]:
    """`env` without any AWS setting, and with nothing (files, instance metadata) that could stand in for them."""
    clean = {k: v for k, v in env.items() if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}
    return {**clean, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def clean_aws(monkeypatch):
    for name in FORWARDED_VARIABLES + CLIENT_PATH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# ---------------------------------------------------------------- no cluster needed


def test_client_settings_are_the_aws_variables_not_the_client_paths(clean_aws, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_PROFILE", "someone")
    settings = client_settings()
    assert settings.values == {"AWS_ENDPOINT_URL": "http://store:9000", "AWS_ACCESS_KEY_ID": "key-1",
                               "AWS_SECRET_ACCESS_KEY": "secret-1", "AWS_REGION": "eu-west-3"}
    assert settings.resolved_from is None


def test_a_profile_is_resolved_into_values_here(clean_aws, monkeypatch, tmp_path):
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = other\naws_secret_access_key = other\n"
                                          "[dev]\naws_access_key_id = key-dev\naws_secret_access_key = secret-dev\n")
    (tmp_path / "config").write_text("[profile dev]\nregion = ap-south-1\nendpoint_url = http://store:9000\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "dev")
    settings = client_settings()
    # Values the cluster can use as they are; the profile's name and the files' paths stay here.
    assert settings.values == {"AWS_ACCESS_KEY_ID": "key-dev", "AWS_SECRET_ACCESS_KEY": "secret-dev",
                               "AWS_DEFAULT_REGION": "ap-south-1", "AWS_ENDPOINT_URL": "http://store:9000"}
    assert settings.resolved_from == "AWS profile `dev`"

    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(JobCredentialsError, match="AWS profile `nope`.*--no-forward-credentials"):
        client_settings()


def test_no_settings_anywhere_hands_nothing(clean_aws):
    assert client_settings().values == {}


BUILD = """\
kind: build
name: {name}
input: {{path: {input}}}
output: {{path: {output}, samples_per_shard: 10}}
download: {{allow_private_networks: true, timeout_s: 10, retries: 0, threads_per_worker: 4}}
resize: {{size: 32}}
scaling: {{workers: 1, cpus_per_worker: 0.5}}
"""


def write_build(path: Path, *, name: str, input: str, output: str, env_vars: dict | None = None) -> Path:  # noqa: A002 - the spec field it fills
    text = BUILD.format(name=name, input=input, output=output)
    if env_vars:
        text += f"ray: {{runtime_env: {{env_vars: {json.dumps(env_vars)}}}}}\n"
    path.write_text(text)
    return path


def test_staged_job_ships_the_settings_in_a_private_file_not_the_runtime_env(tmp_path):
    spec = load_spec(write_build(tmp_path / "b.yaml", name="b", input="urls.csv", output="s3://bucket/out",
                                 env_vars={"AWS_REGION": "from-spec"}))
    given = {"AWS_ACCESS_KEY_ID": "key-1", "AWS_SECRET_ACCESS_KEY": "secret-1", "AWS_REGION": "from-client"}
    settings = forwarded_settings(spec, given)
    assert settings == {"AWS_ACCESS_KEY_ID": "key-1", "AWS_SECRET_ACCESS_KEY": "secret-1"}  # the spec's value wins
    with staged_job(spec, credentials=settings) as (entrypoint, env):
        wd = Path(env["working_dir"])
        assert entrypoint == f"python -m clipforge run spec.yaml --credentials-file {CREDENTIALS_FILE}"
        path = wd / CREDENTIALS_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text()) == settings
        assert env["worker_process_setup_hook"] == WORKER_SETUP_HOOK
        assert "secret-1" not in json.dumps(env)
        assert env["env_vars"]["AWS_REGION"] == "from-spec"
    with staged_job(spec) as (entrypoint, env):  # nothing to hand on: no file, no hook
        assert entrypoint == "python -m clipforge run spec.yaml"
        assert not (Path(env["working_dir"]) / CREDENTIALS_FILE).exists() and "worker_process_setup_hook" not in env


def test_submit_names_what_it_forwards_and_never_a_value(tmp_path):
    spec = write_build(tmp_path / "b.yaml", name="b", input="urls.csv", output="s3://bucket/out",
                       env_vars={"AWS_SECRET_ACCESS_KEY": "secret-in-spec"})
    env = {**no_aws(ray_cluster.CLIENT_ENV), "AWS_ENDPOINT_URL": "http://store:9000", "AWS_ACCESS_KEY_ID": "key-1",
           "AWS_SECRET_ACCESS_KEY": "secret-of-client"}
    r = cli("submit", str(spec), "--address", f"http://127.0.0.1:{ray_cluster.free_port()}", env=env)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 3, r.stderr
    assert lines[0].startswith("warning: field `ray.runtime_env.env_vars` sets AWS_SECRET_ACCESS_KEY: the cluster's "
                               "job, task and actor listings show the values")
    # The spec's own secret wins over the client's, so only the other two are handed on.
    assert lines[1] == "forwarding AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID to the job, out of its listings"
    assert lines[2].startswith("error: cannot reach the Ray cluster") and "connection refused" in lines[2]
    assert not any(value in r.stderr for value in ("secret-in-spec", "secret-of-client", "key-1", "store:9000"))

    r = cli("submit", str(spec), "--no-forward-credentials", "--address",
            f"http://127.0.0.1:{ray_cluster.free_port()}", env=env)
    assert "not forwarding object-store settings (--no-forward-credentials)" in r.stderr
    assert "forwarding AWS" not in r.stderr


def test_a_sweep_hands_its_children_the_same_choice():
    # The sweep path passes the CLI's choice to every child's submission; with no cluster it ends at the
    # connection, after the one note naming the choice (no refusal, no forwarding line).
    r = cli("submit", "configs/sweep/lr_batch_tiny.yaml", "--no-forward-credentials", "--address",
            f"http://127.0.0.1:{ray_cluster.free_port()}", env=no_aws(ray_cluster.CLIENT_ENV))
    assert r.returncode == 1, r.stderr
    assert "not forwarding object-store settings (--no-forward-credentials)" in r.stderr
    assert "cannot reach the Ray cluster" in r.stderr


def test_settings_from_the_file_are_not_handed_on_again(tmp_path, monkeypatch):
    monkeypatch.setattr(remote_env, "_reaching_workers_otherwise", set())
    for name in FORWARDED_VARIABLES:
        monkeypatch.setenv(name, "from-node")  # restored afterwards, whatever the file sets
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"AWS_ACCESS_KEY_ID": "key-1", "AWS_SECRET_ACCESS_KEY": "secret-1"}))
    assert apply_credentials_file(path) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "secret-1"
    # The job's workers read the same file; only what the node had is still forwarded.
    assert set(remote_env.forwarded_env(output_is_local=False)) == set(FORWARDED_VARIABLES) - {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

    path.write_text(json.dumps({"AWS_ACCESS_KEY_ID": "k", "LD_PRELOAD": "/tmp/x.so"}))
    with pytest.raises(JobCredentialsError, match="LD_PRELOAD; it may set only object-store settings"):
        apply_credentials_file(path)


# ---------------------------------------------------------------- a real Ray head without credentials of its own


@pytest.fixture(scope="module")
def bare_head():
    """A private Ray head (ray_cluster.running_head) whose processes have no object-store settings: only what a
    job is handed reaches the store."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in ray_cluster.CLIENT_ENV if k.startswith("AWS_")]:
            mp.delitem(ray_cluster.CLIENT_ENV, name)
        for name, value in no_aws({}).items():
            mp.setitem(ray_cluster.CLIENT_ENV, name, value)
        yield from ray_cluster.running_head()


@pytest.fixture(scope="module")
def image_server():
    with ImageServer() as server:
        yield server


def _get(url: str, **headers: str) -> str:
    r = requests.get(url, headers=headers, timeout=60)
    return f"HTTP {r.status_code}\n{r.text}"


STATE_VIEWS = ("/api/jobs/", "/api/v0/jobs?detail=true", "/api/v0/tasks?detail=true&limit=10000",
               "/api/v0/actors?detail=true&limit=10000", "/api/v0/workers?detail=true&limit=10000",
               "/api/v0/runtime_envs?detail=true", "/api/v0/nodes?detail=true",
               "/api/v0/placement_groups?detail=true", "/logical/actors", "/nodes?view=summary",
               "/api/cluster_status?format=1", "/events")


def collect_listings(address: str, job_ids: list[str]) -> dict[str, str]:
    """{what: text} of everything the head serves about its jobs, tasks, actors, nodes and logs, each view both as
    an API client (the `ray` and `clipforge` commands, scripts) and as a browser (the dashboard)."""
    views = [*STATE_VIEWS, *(f"/api/jobs/{j}" for j in job_ids), *(f"/api/jobs/{j}/logs" for j in job_ids)]
    texts = {}
    for view in views:
        texts[view] = _get(address + view)
        texts[f"{view} (browser)"] = _get(address + view, **BROWSER)
    nodes = requests.get(f"{address}/api/v0/nodes", timeout=60).json()["data"]["result"]["result"]
    for node in nodes:
        node_id = node["node_id"]
        files = requests.get(f"{address}/api/v0/logs", params={"node_id": node_id}, timeout=60).json()
        for names in files["data"]["result"].values():
            for name in names:
                texts[f"log {name}"] = _get(f"{address}/api/v0/logs/file?node_id={node_id}&filename={name}"
                                            "&lines=1000000")
    return texts


def find_markers(texts: dict[str, str], markers: dict[str, str]) -> dict[str, list[str]]:
    """{where: [marker names found there]}."""
    found = {}
    for where, text in texts.items():
        names = [name for name, value in markers.items() if value in text]
        if names:
            found[where] = names
    return found


def _submit_build(head: str, env: dict[str, str], tmp_path: Path, server: ImageServer, name: str,
                  *options: str):
    bucket = new_bucket(env["AWS_ENDPOINT_URL"])
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"{server.url(f'/img/40x30.png?seed={i}')},pattern {i}\n"
                                              for i in range(3)))
    spec = write_build(tmp_path / "build.yaml", name=name, input=str(urls), output=f"s3://{bucket}/shards")
    return cli("submit", str(spec), "--address", head, *options, env=env), bucket


@pytest.mark.slow
def test_a_job_reaches_s3_with_the_clients_settings_and_no_listing_shows_them(bare_head, moto_endpoint,
                                                                              image_server, tmp_path):
    markers = {"AWS_ACCESS_KEY_ID": f"cfkey{uuid.uuid4().hex[:12]}",
               "AWS_SECRET_ACCESS_KEY": f"cfsecret{uuid.uuid4().hex}",
               "AWS_SESSION_TOKEN": f"cftoken{uuid.uuid4().hex}"}
    # moto takes any key; the secret values are markers to look for.
    client_env = {**no_aws(ray_cluster.CLIENT_ENV), "AWS_ENDPOINT_URL": moto_endpoint,
                  "AWS_DEFAULT_REGION": REGION, **markers}
    r, bucket = _submit_build(bare_head, client_env, tmp_path, image_server, "cred-build")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    assert ("forwarding AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
            "AWS_DEFAULT_REGION to the job, out of its listings") in r.stderr
    assert not find_markers({"submit": r.stdout + r.stderr}, markers)

    # The driver (stats.json) and the shard task on a worker (the shard) both wrote to the store.
    fs = s3fs_for(moto_endpoint)
    written = {p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/shards")}
    assert {"00000.tar", "stats.json"} <= written, written
    assert json.loads(fs.cat_file(f"{bucket}/shards/stats.json"))["status_counts"] == {"ok": 3}

    texts = collect_listings(bare_head, [job_id])
    for args in (("jobs", "list"), ("jobs", "status", job_id), ("jobs", "logs", job_id)):
        out = cli(*args, "--address", bare_head)
        assert out.returncode == 0, out.stderr
        texts[f"clipforge {' '.join(args)}"] = out.stdout + out.stderr
    # The listings were read: they name this job and its shard task.
    assert job_id in texts["/api/jobs/"] and job_id in texts["clipforge jobs list"]
    assert "iter_build_shard" in texts["/api/v0/tasks?detail=true&limit=10000"]
    assert any(where.startswith("log ") for where in texts)
    assert find_markers(texts, markers) == {}


@pytest.mark.slow
def test_without_forwarding_the_same_job_fails_for_lack_of_credentials(bare_head, moto_endpoint, image_server,
                                                                      tmp_path):
    client_env = {**no_aws(ray_cluster.CLIENT_ENV), "AWS_ENDPOINT_URL": moto_endpoint,
                  "AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "key-1", "AWS_SECRET_ACCESS_KEY": "secret-1"}
    r, bucket = _submit_build(bare_head, client_env, tmp_path, image_server, "cred-none",
                              "--no-forward-credentials")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.splitlines()[0].strip()
    assert "not forwarding object-store settings (--no-forward-credentials)" in r.stderr
    assert f"job {job_id} FAILED" in r.stderr
    logs = cli("jobs", "logs", job_id, "--address", bare_head).stdout
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert errors == [f"error: field `output.path`: s3://{bucket}/shards: no credentials for the object store: "
                      "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where the job runs, or "
                      "give them in the path's storage_options"], logs[-3000:]
    assert errors[0] in r.stderr  # submit shows it in the failed job's log tail
