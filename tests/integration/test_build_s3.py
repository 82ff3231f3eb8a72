"""Builds that read their URL list from S3 and write shards there, against a real moto S3 server.

Ray is started (by the session fixture) before any AWS variable is set, so its workers only reach
the S3 endpoint if the builder hands them the settings itself.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.pipeline.build import run_build
from clipforge.pipeline.imaging import EncodedImage
from clipforge.pipeline.layout import OutputLayout, sample_key
from clipforge.pipeline.sample import InputRow, RowOutcome
from clipforge.pipeline.shard_writer import ShardWriter
from clipforge.pipeline.spec import BuildSpec
from clipforge.runtime.remote_env import FORWARDED_VARIABLES

from http_fixtures import ImageServer
from s3_server import KEY_ID, REGION, SECRET, new_bucket, s3fs_for, storage_options

SPS = 4


@pytest.fixture
def no_aws_env(monkeypatch):
    for name in FORWARDED_VARIABLES + ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    # No credentials file or instance metadata may stand in for the settings under test.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def aws_env(ray_local, moto_endpoint, no_aws_env, monkeypatch):
    """AWS settings in the environment only, set after Ray (and its workers) started."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    return moto_endpoint


def upload_url_list(fs, path: str, rows: list[tuple[str, str]]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}), buf)
    fs.pipe_file(path, buf.getvalue())


def make_spec(inp: str, out: str, **sections) -> BuildSpec:
    raw = {
        "kind": "build",
        "name": "s3-build",
        "input": {"path": inp},
        "output": {"path": out, "samples_per_shard": SPS},
        "download": {"allow_private_networks": True, "timeout_s": 5.0, "retries": 0, "threads_per_worker": 4},
        "resize": {"size": 24, "mode": "border"},
        "filters": {"dedup_exact": True},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return BuildSpec.model_validate(raw)


def url_rows(server: ImageServer) -> list[tuple[str, str, str]]:
    u = server.url
    return [
        (u("/img/40x30.jpg?seed=1"), "one", "ok"),
        (u("/img/30x40.png?seed=2"), "two", "ok"),
        (u("/status/404"), "missing", "http_404"),
        (u("/img/40x30.jpg?seed=3"), "three", "ok"),
        (u("/img/40x30.jpg?seed=1&again=1"), "same bytes as row 0", "duplicate"),
        (u("/img/50x50.webp?seed=5"), "five", "ok"),
        (u("/img/20x40.jpg?seed=6"), "six", "ok"),
        ("not a url", "bad", "invalid_url"),
        (u("/img/33x33.gif?seed=8"), "eight", "ok"),
    ]


def read_manifest(fs, out: str) -> list[dict]:
    paths = sorted(fs.glob(f"{out}/manifest/*.parquet"))
    return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(p))) for p in paths]).to_pylist()


def pipe_url(s3_url: str) -> str:
    """A webdataset `pipe:` URL that streams an S3 object through fsspec (settings from the environment)."""
    code = "import fsspec,shutil,sys; shutil.copyfileobj(fsspec.open(sys.argv[1]).open(), sys.stdout.buffer)"
    return f"pipe:{sys.executable} -c '{code}' {s3_url}"


def check_build(fs, bucket: str, rows: list[tuple[str, str, str]], stats: dict) -> dict[str, dict]:
    """Manifest, stats and every shard as they are on S3; returns the samples read with webdataset."""
    import webdataset as wds

    out = f"{bucket}/out"
    manifest = read_manifest(fs, out)
    assert [r["row"] for r in manifest] == list(range(len(rows)))
    assert [r["status"] for r in manifest] == [r[2] for r in rows]
    assert json.loads(fs.cat_file(f"{out}/stats.json")) == stats
    assert stats["status_counts"]["ok"] == sum(r[2] == "ok" for r in rows)
    assert stats["dedup"]["duplicates_marked"] == 1
    tars = sorted(fs.glob(f"{out}/*.tar"))
    assert [p.rsplit("/", 1)[1] for p in tars] == [f"{s:05d}.tar" for s in range((len(rows) + SPS - 1) // SPS)]
    # Nothing hidden or half-uploaded is left behind: the one hidden object is the folder's owner record.
    assert [p.rsplit("/", 1)[1] for p in fs.find(bucket) if p.rsplit("/", 1)[1].startswith(".")] == \
        [".clipforge-output"]
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []

    samples = {s["__key__"]: s for s in wds.WebDataset([pipe_url(f"s3://{p}") for p in tars],
                                                       shardshuffle=False, empty_check=False)}
    ok = {r["key"]: r for r in manifest if r["status"] == "ok"}
    assert sorted(samples) == sorted(ok)
    for key, s in samples.items():
        meta = json.loads(s["json"])
        assert meta["row"] == ok[key]["row"] and s["txt"].decode() == rows[meta["row"]][1]
        assert meta["sha256"] == hashlib.sha256(s["jpg"]).hexdigest()
    return samples


def test_build_from_and_to_s3_with_settings_from_the_environment(aws_env, tmp_path):
    import pyarrow.fs as pafs
    import ray

    fs = s3fs_for(aws_env)
    bucket = new_bucket(aws_env)
    with ImageServer() as server:
        rows = url_rows(server)
        upload_url_list(fs, f"{bucket}/lists/urls.parquet", [(r[0], r[1]) for r in rows])
        spec = make_spec(f"s3://{bucket}/lists/urls.parquet", f"s3://{bucket}/out")
        stats = run_build(spec, progress=False)
    samples = check_build(fs, bucket, rows, stats)

    # Ray Data reads the same shards through a pyarrow S3 filesystem.
    host = aws_env.split("://", 1)[1]
    s3 = pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=KEY_ID, secret_key=SECRET,
                           region=REGION)
    ds = ray.data.read_webdataset(sorted(fs.glob(f"{bucket}/out/*.tar")), filesystem=s3, decoder=None,
                                  override_num_blocks=2, num_cpus=0.5)
    got = {r["__key__"]: r for r in ds.take_all()}
    assert sorted(got) == sorted(samples)
    for key, r in got.items():
        assert bytes(r["jpg"]) == samples[key]["jpg"] and bytes(r["txt"]) == samples[key]["txt"]

    # A re-run finds every shard complete on S3 and rewrites nothing.
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/out") if not p.endswith("stats.json")}
    again = run_build(spec, progress=False)
    assert again["shards_written"] == 0 and again["status_counts"] == stats["status_counts"]
    assert {p: fs.info(p, refresh=True)["ETag"] for p in before} == before


def test_build_with_storage_options_from_the_spec_only(ray_local, moto_endpoint, no_aws_env):
    opts = storage_options(moto_endpoint)
    fs = s3fs_for(moto_endpoint)
    bucket = new_bucket(moto_endpoint)
    with ImageServer() as server:
        rows = url_rows(server)
        upload_url_list(fs, f"{bucket}/lists/urls.parquet", [(r[0], r[1]) for r in rows])
        spec = make_spec(f"s3://{bucket}/lists/urls.parquet", f"s3://{bucket}/out",
                         input={"storage_options": opts}, output={"storage_options": opts})
        assert not any(os.environ.get(v) for v in FORWARDED_VARIABLES)
        stats = run_build(spec, progress=False)
    with pytest.MonkeyPatch.context() as mp:  # the pipe: readers get their settings from the environment
        mp.setenv("AWS_ENDPOINT_URL", moto_endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        check_build(fs, bucket, rows, stats)


def _outcome(i: int, size: int) -> RowOutcome:
    data = os.urandom(size)
    image = EncodedImage(data, 24, 24, 24, 24, hashlib.sha256(data).hexdigest())
    return RowOutcome(InputRow(row=i, url=f"http://example.com/{i}.jpg", caption=f"c{i}"), i, "ok", image=image)


def test_tar_is_invisible_on_s3_until_committed_and_leaves_nothing_when_discarded(moto_endpoint):
    fs = s3fs_for(moto_endpoint)
    bucket = new_bucket(moto_endpoint)
    # 5 MiB parts (the S3 minimum), so a few samples already upload parts before the tar is complete.
    layout = OutputLayout(f"s3://{bucket}/out", {**storage_options(moto_endpoint), "default_block_size": 5 << 20})
    layout.make_dirs()
    final = f"{bucket}/out/00000.tar"

    writer = ShardWriter(layout, 0, "jpg", 1, [])
    for i in range(4):
        writer.add(_outcome(i, 2 << 20))
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["out/00000.tar"]  # parts are on S3 already...
    assert not fs.exists(final)  # ...yet nothing is visible under the final key
    writer.discard()
    assert not fs.exists(final)
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []

    writer = ShardWriter(layout, 0, "jpg", 1, [])
    outcomes = [_outcome(i, 2 << 20) for i in range(4)]
    expected = {f"{sample_key(0, i, 1)}.jpg": hashlib.sha256(o.image.data).hexdigest() for i, o in enumerate(outcomes)}
    for o in outcomes:
        writer.add(o)
    assert not fs.exists(final)
    summary = writer.commit()
    assert summary["rows"] == 4 and fs.exists(final)
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(final))) as tar:
        got = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.name.endswith(".jpg")}
    assert got == expected
    assert layout.completed_shards() == {0}


def test_killed_s3_writer_leaves_no_object_and_the_next_attempt_aborts_its_upload(moto_endpoint, tmp_path):
    fs = s3fs_for(moto_endpoint)
    bucket = new_bucket(moto_endpoint)
    opts = {**storage_options(moto_endpoint), "default_block_size": 5 << 20}
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from clipforge.runtime.environment import apply_entry_point_defaults
        apply_entry_point_defaults()
        from clipforge.pipeline.layout import OutputLayout
        out = OutputLayout("s3://{bucket}/out", {opts!r})
        f = out.open_atomic(out.tar(3))
        f.write(os.urandom(6 << 20))  # more than one part: the upload has started
        print("writing", flush=True)
        time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert len(fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not fs.exists(f"{bucket}/out/00003.tar")

    layout = OutputLayout(f"s3://{bucket}/out", opts)
    ShardWriter(layout, 3, "jpg", 1, []).discard()  # a new attempt at shard 3 starts by cleaning up
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    assert layout.completed_shards() == set()
