"""Dataset builder (`kind: build`) against a real loopback HTTP server, a real local Ray and real files."""
from __future__ import annotations

import collections
import gzip
import hashlib
import io
import ipaddress
import json
import tarfile
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipforge.pipeline.build import run_build
from clipforge.pipeline.errors import BuildInputError
from clipforge.pipeline.fetch import Fetcher
from clipforge.pipeline.imaging import ImageRejected, process_image
from clipforge.pipeline.layout import key_digits, sample_key
from clipforge.pipeline.netguard import AddressPolicy, AddressRefused, is_public
from clipforge.pipeline.robots import opted_out, user_agent_token
from clipforge.pipeline.spec import BuildSpec, DownloadSpec, FilterSpec, ResizeSpec
from clipforge.pipeline.urls import InvalidURL, parse_target

from http_fixtures import ImageServer, encode_image, pattern_image
from ports import free_port

SPS = 6  # samples per shard in the main build: small, so the rows spread over several shards


@pytest.fixture(scope="module")
def server():
    with ImageServer() as s:
        yield s


def make_spec(inp: Path | str, out: Path, **sections) -> BuildSpec:
    raw = {
        "kind": "build",
        "name": "test-build",
        "input": {"path": str(inp)},
        "output": {"path": str(out), "samples_per_shard": SPS},
        # 2 s: generous for a busy 2-core machine, still well below the /slow route's delay.
        "download": {"allow_private_networks": True, "timeout_s": 2.0, "retries": 1, "retry_backoff_s": 0.05,
                     "threads_per_worker": 8},
        "resize": {"size": 32, "mode": "border"},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return BuildSpec.model_validate(raw)


def write_parquet(path: Path, rows: list[tuple], extra: str = "source") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "url": [r[0] for r in rows],
        "caption": [r[1] for r in rows],
        extra: [f"src-{i}" for i in range(len(rows))],
    }), path)
    return path


def read_manifest(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted((out / "manifest").glob("*.parquet"))]
    return pa.concat_tables(tables).to_pylist() if tables else []


def read_samples(out: Path) -> dict[str, dict]:
    """Every sample of every shard, read back with webdataset itself."""
    import webdataset as wds

    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def key_of(row: int) -> str:
    return f"{row // SPS:05d}{row % SPS}"


# -- one build that exercises every outcome ---------------------------------------------------------


def _main_rows(server: ImageServer) -> list[tuple[str, str | None, str]]:
    """(url, caption, expected status) for every outcome the builder knows."""
    u = server.url
    to = quote("/img/80x60.webp?seed=3", safe="")
    return [
        (u("/img/64x48.jpg?seed=1"), "a plain jpeg", "ok"),
        (u("/img/100x50.png?seed=2&alpha=1"), "a transparent png", "ok"),
        (u("/status/404"), "missing", "http_404"),
        (u("/flaky/r3?fails=1&code=500"), "fails once with 500", "ok"),
        (u("/slow?delay=6"), "too slow", "timeout"),
        (u("/text"), "html bytes", "not_an_image"),
        (u("/big?bytes=300000"), "large with length", "too_large"),
        (u("/big?bytes=300000&length=0"), "large without length", "too_large"),
        (u("/bomb"), "30000x30000 header", "too_many_pixels"),
        (u("/bomb?w=2000&h=2000"), "above max_pixels", "too_many_pixels"),
        (u("/robots?tag=noai"), "opted out", "opted_out"),
        (u("/robots?tag=otherbot:%20noimageai"), "opt-out for another crawler", "ok"),
        (u(f"/redirect?hops=2&to={to}"), "two redirects", "ok"),
        (u("/redirect-loop"), "endless redirects", "too_many_redirects"),
        (u(f"/redirect?to={quote('/status/404', safe='')}"), "redirect to a 404", "http_404"),
        (u("/status/503"), "always 503", "http_503"),
        ("", "no url", "empty_url"),
        ("not a url", "garbage", "invalid_url"),
        (u("/img/10x10.jpg"), "tiny image", "too_small"),
        (u("/img/200x20.jpg"), "a thin strip", "bad_aspect_ratio"),
        (u("/img/64x48.jpg?seed=5"), "x", "caption_too_short"),
        (u("/img/64x48.jpg?seed=6"), "y" * 50, "caption_too_long"),
        (u("/img/64x48.jpg?seed=1&copy=1"), "same bytes as row 0", "duplicate"),
        (u("/flaky/r23?fails=1&code=429"), "rate limited once", "ok"),
        (u("/img/64x48.gif?seed=8"), "a gif", "ok"),
        (u("/img/64x48.jpg?seed=9"), "first of a pair", "ok"),
        (u("/img/64x48.jpg?seed=9&again=1"), "second of a pair", "duplicate"),
        (f"http://127.0.0.1:{free_port()}/img/1x1.jpg", "nobody listens", "connection_error"),
    ]


@pytest.fixture(scope="module")
def main_build(server, ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main")
    rows = _main_rows(server)
    inp = write_parquet(tmp / "urls.parquet", [(r[0], r[1]) for r in rows])
    spec = make_spec(
        inp, tmp / "out",
        input={"extra_cols": ["source"]},
        download={"max_bytes": 200_000, "max_pixels": 1_000_000},
        filters={"min_image_size": 16, "max_aspect_ratio": 4.0, "min_caption_chars": 2, "max_caption_chars": 40,
                 "dedup_exact": True},
    )
    stats = run_build(spec, progress=False)
    return {"spec": spec, "rows": rows, "stats": stats, "out": tmp / "out", "hits": dict(server.hits)}


def test_every_outcome_lands_in_the_manifest_once(main_build):
    rows, out = main_build["rows"], main_build["out"]
    manifest = read_manifest(out)
    assert sorted(r["row"] for r in manifest) == list(range(len(rows)))
    got = {r["row"]: r for r in manifest}
    for i, (url, _caption, expected) in enumerate(rows):
        rec = got[i]
        assert rec["status"] == expected, (i, url, rec)
        assert rec["shard"] == i // SPS
        if expected == "ok":
            assert rec["key"] == key_of(i) and rec["error"] is None
        else:
            assert rec["key"] is None and rec["error"], rec
    assert "row 0" in got[22]["error"] and "row 25" in got[26]["error"]
    assert "after 2 attempts" in got[15]["error"]


def test_transient_failures_are_retried_and_permanent_ones_are_not(main_build):
    hits = main_build["hits"]
    assert hits["/flaky/r3"] == 2 and hits["/flaky/r23"] == 2  # 500 / 429 once, then success
    assert hits["/status/503"] == 2  # retries: 1
    assert hits["/slow"] == 2  # timeouts are retried
    assert hits["/status/404"] == 2  # row 2 and the redirect of row 14, each asked once
    assert hits["/redirect-loop"] == 6  # the first request and 5 followed redirects
    assert hits["/redirect"] == 3  # two hops for row 12, one for row 14


def test_shards_read_back_with_webdataset(main_build):
    rows, out, spec = main_build["rows"], main_build["out"], main_build["spec"]
    samples = read_samples(out)
    ok_rows = [i for i, r in enumerate(rows) if r[2] == "ok"]
    assert sorted(samples) == sorted(key_of(i) for i in ok_rows)
    for i in ok_rows:
        s = samples[key_of(i)]
        assert {"jpg", "txt", "json"} <= set(s)
        meta = json.loads(s["json"])
        assert meta["row"] == i and meta["url"] == rows[i][0] and meta["key"] == key_of(i)
        assert s["txt"].decode() == rows[i][1] == meta["caption"]
        assert meta["source"] == f"src-{i}"
        assert meta["sha256"] == hashlib.sha256(s["jpg"]).hexdigest()
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.size == (spec.resize.size, spec.resize.size) == (meta["width"], meta["height"])
    assert (json.loads(samples[key_of(1)]["json"])["original_width"],
            json.loads(samples[key_of(1)]["json"])["original_height"]) == (100, 50)
    # No temporary file is left behind under any name (the one hidden file is the folder's owner record).
    assert [p.name for p in out.rglob(".*")] == [".clipforge-output"]


def test_img2dataset_compatible_files_and_stats(main_build):
    rows, out, stats = main_build["rows"], main_build["out"], main_build["stats"]
    n_shards = (len(rows) + SPS - 1) // SPS
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{s:05d}.tar" for s in range(n_shards)]
    table = pa.concat_tables([pq.read_table(out / f"{s:05d}.parquet") for s in range(n_shards)]).to_pylist()
    by_row = {r["row"]: r for r in table}
    for col in ("key", "url", "caption", "status", "error_message", "width", "height", "source"):
        assert col in table[0]
    assert by_row[0]["status"] == "success" and by_row[0]["width"] == 32
    assert by_row[2]["status"] == "failed_to_download" and "404" in by_row[2]["error_message"]
    assert by_row[5]["status"] == "failed_to_resize"
    assert by_row[22]["status"] == "filtered" and by_row[22]["width"] is None
    shard_stats = [json.loads((out / f"{s:05d}_stats.json").read_text()) for s in range(n_shards)]
    assert sum(s["count"] for s in shard_stats) == len(rows)
    assert sum(s["successes"] for s in shard_stats) == sum(r[2] == "ok" for r in rows)

    expected = collections.Counter(r[2] for r in rows)
    assert stats["status_counts"] == dict(expected)
    assert stats["total"] == len(rows) and stats["ok"] == expected["ok"]
    assert stats["shards_written"] == n_shards and stats["dedup"]["duplicates_marked"] == 2
    assert json.loads((out / "stats.json").read_text()) == stats


def test_rerun_is_a_noop_and_a_lost_shard_is_rebuilt_with_the_same_keys(main_build):
    spec, out = main_build["spec"], main_build["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "stats.json"}
    manifest_before = read_manifest(out)
    keys_before = sorted(read_samples(out))

    again = run_build(spec, progress=False)
    assert again["shards_written"] == 0 and again["status_counts"] == main_build["stats"]["status_counts"]
    assert {p: p.stat().st_mtime_ns for p in before} == before

    lost = 4  # rows 24-27: a gif, a duplicate pair and a refused connection
    (out / f"{lost:05d}.tar").unlink()
    (out / "manifest" / f"{lost:05d}.parquet").unlink()
    rebuilt = run_build(spec, progress=False)
    assert rebuilt["shards_written"] == 1
    assert read_manifest(out) == manifest_before
    assert sorted(read_samples(out)) == keys_before
    untouched = {p: t for p, t in before.items() if not p.name.startswith(f"{lost:05d}")}
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


# -- private addresses ------------------------------------------------------------------------------


def test_private_addresses_are_refused_without_connecting(server, ray_local, tmp_path):
    port = server.port
    urls = [
        f"http://127.0.0.1:{port}/img/31x31.jpg",
        f"http://localhost:{port}/img/31x31.jpg",  # a name that resolves to loopback
        f"http://[::1]:{port}/img/31x31.jpg",
        f"http://2130706433:{port}/img/31x31.jpg",  # 127.0.0.1 written as one number
        "http://10.1.2.3/img.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/x.jpg",
    ]
    inp = write_parquet(tmp_path / "urls.parquet", [(u, "a caption") for u in urls])
    spec = make_spec(inp, tmp_path / "out", download={"allow_private_networks": False})
    spec.min_success_fraction = 0  # every row is refused: a build that would otherwise fail for it
    stats = run_build(spec, progress=False)
    assert stats["status_counts"] == {"private_address": len(urls)}
    assert all("allow_private_networks" in r["error"] for r in read_manifest(tmp_path / "out"))
    assert server.hits["/img/31x31.jpg"] == 0


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "::1",
                                  "fd00::1", "fe80::1", "224.0.0.1", "ff02::1", "0.0.0.0", "::", "::ffff:127.0.0.1",
                                  "100.64.0.1", "64:ff9b::a00:1"])
def test_non_public_addresses(addr):
    assert not is_public(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(addr):
    assert is_public(ipaddress.ip_address(addr))


def test_policy_resolves_names_and_checks_every_address():
    with pytest.raises(AddressRefused, match="localhost"):
        AddressPolicy(allow_private=False).resolve("localhost", 80)
    assert ipaddress.ip_address(AddressPolicy(allow_private=True).resolve("localhost", 80)).is_loopback


def test_pinned_connection_keeps_host_header_and_is_reused(server):
    """Connections go to the checked IP, yet the server sees the original Host; keep-alive is used."""
    cfg = DownloadSpec(allow_private_networks=True, threads_per_worker=1, timeout_s=2)
    before = set(server.client_ports)
    with Fetcher(cfg) as fetcher:
        bodies = [fetcher.fetch(server.url(f"/img/20x20.png?seed={i}", host="localhost")) for i in range(4)]
    assert len(set(bodies)) == 4 and all(b.startswith(b"\x89PNG") for b in bodies)
    headers = {k.lower(): v for k, v in server.last_headers["/img/20x20.png"].items()}
    assert headers["host"] == f"localhost:{server.port}"
    assert headers["user-agent"] == cfg.user_agent
    assert len(server.client_ports - before) == 1  # four requests, one connection


# -- input formats and input errors ---------------------------------------------------------------


def test_text_inputs_glob_and_bad_rows(server, ray_local, tmp_path):
    u = server.url
    folder = tmp_path / "in"
    folder.mkdir()
    csv_text = ("url,caption,source\n"
                f"{u('/img/40x30.jpg?seed=20')},\"csv, quoted\",a\n"
                "only,two\n"  # wrong number of fields: not a row
                f"{u('/img/30x40.png?seed=21')},second csv,a\n"
                f"{u('/status/404')},third csv,a\n")
    (folder / "a.csv.gz").write_bytes(gzip.compress(csv_text.encode()))
    (folder / "b.jsonl").write_text("\n".join([
        json.dumps({"url": u("/img/50x50.webp?seed=22"), "caption": "json row", "source": "b"}),
        "{this is not json",
        json.dumps({"caption": "no url key", "source": "b"}),
    ]) + "\n")
    (folder / "c.tsv").write_text("url\tcaption\tsource\n"
                                  f"{u('/img/64x32.jpg?seed=23')}\ta \"quoted\" tsv caption\tc\n")
    spec = make_spec(str(folder / "*"), tmp_path / "out", input={"extra_cols": ["source"]},
                     output={"samples_per_shard": 4, "image_format": "webp"},
                     resize={"size": 24, "mode": "center_crop"})
    stats = run_build(spec, progress=False)
    statuses = [r["status"] for r in read_manifest(tmp_path / "out")]
    assert statuses == ["ok", "ok", "http_404", "ok", "invalid_url", "empty_url", "ok"]
    assert stats["malformed_input_lines"] == 1
    samples = read_samples(tmp_path / "out")
    captions = {json.loads(s["json"])["row"]: s["txt"].decode() for s in samples.values()}
    assert captions == {0: "csv, quoted", 1: "second csv", 3: "json row", 6: 'a "quoted" tsv caption'}
    for s in samples.values():
        img = Image.open(io.BytesIO(s["webp"]))
        assert img.format == "WEBP" and img.size == (24, 24)
        assert json.loads(s["json"])["source"] in {"a", "b", "c"}


def test_input_errors_name_the_file_and_column(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BuildInputError, match="does not exist"):
        run_build(make_spec(tmp_path / "nope.parquet", out), progress=False)
    with pytest.raises(BuildInputError, match="matches no files"):
        run_build(make_spec(str(tmp_path / "*.csv"), out), progress=False)

    bad_col = write_parquet(tmp_path / "list.parquet", [("http://example.com/a.jpg", "c")])
    with pytest.raises(BuildInputError, match=r"list\.parquet: column `image_url` \(input\.url_col\) not found"):
        run_build(make_spec(bad_col, out, input={"url_col": "image_url"}), progress=False)

    (tmp_path / "list.csv").write_text("url,text\nhttp://example.com/a.jpg,hi\n")
    with pytest.raises(BuildInputError, match=r"list\.csv: column `caption` \(input\.caption_col\)"):
        run_build(make_spec(tmp_path / "list.csv", out), progress=False)

    (tmp_path / "list.xlsx").write_bytes(b"PK")
    with pytest.raises(BuildInputError, match="cannot tell the format"):
        run_build(make_spec(tmp_path / "list.xlsx", out), progress=False)

    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BuildInputError, match=r"broken\.parquet: cannot read as parquet"):
        run_build(make_spec(tmp_path / "broken.parquet", out), progress=False)
    assert not out.exists()  # nothing was started


# -- images: resize semantics against img2dataset's own resizer -----------------------------------

_SHAPES = [(100, 50), (50, 100), (64, 64), (20, 10), (333, 77)]
_MODES = ["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]


@pytest.fixture(scope="module")
def img2dataset_resizer():
    from img2dataset.resizer import Resizer

    return lambda mode: Resizer(image_size=32, resize_mode=mode, resize_only_if_bigger=False,
                                encode_format="png", encode_quality=1)


@pytest.mark.parametrize("mode", _MODES)
def test_resize_modes_match_img2dataset(mode, img2dataset_resizer):
    import numpy as np

    for w, h in _SHAPES:
        png = encode_image(pattern_image(w, h, seed=w), "png")
        ours = process_image(png, ResizeSpec(size=32, mode=mode), FilterSpec(), 10**8, "png", 95)
        theirs, tw, th, ow, oh, err = img2dataset_resizer(mode)(io.BytesIO(png))
        assert err is None
        assert (ours.width, ours.height, ours.original_width, ours.original_height) == (tw, th, ow, oh), (mode, w, h)
        a = np.asarray(Image.open(io.BytesIO(ours.data)).convert("RGB"), dtype=np.float32)
        b = np.asarray(Image.open(io.BytesIO(theirs)).convert("RGB"), dtype=np.float32)
        # Same geometry (placement, crop, padding colour); only the resampling filters differ.
        assert np.abs(a - b).mean() < 8, (mode, w, h, np.abs(a - b).mean())


def test_border_pads_white_and_alpha_becomes_white():
    img = pattern_image(100, 50, seed=3, alpha=True)  # left half transparent
    out = process_image(encode_image(img, "png"), ResizeSpec(size=32, mode="border"), FilterSpec(), 10**8, "png", 95)
    px = Image.open(io.BytesIO(out.data)).convert("RGB")
    assert px.size == (32, 32)
    assert px.getpixel((16, 2)) == (255, 255, 255)  # padding above the 32x16 image
    assert px.getpixel((4, 16)) == (255, 255, 255)  # transparent half composited on white
    assert px.getpixel((28, 16)) != (255, 255, 255)  # opaque half kept


def test_exif_orientation_is_applied_before_sizing():
    img = pattern_image(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    out = process_image(buf.getvalue(), ResizeSpec(size=20, mode="keep_ratio"), FilterSpec(), 10**8, "jpg", 90)
    assert (out.original_width, out.original_height) == (30, 60)
    assert (out.width, out.height) == (20, 40)


def test_pixel_limit_is_checked_before_decoding():
    from http_fixtures import png_claiming_size

    with pytest.raises(ImageRejected) as e:
        process_image(png_claiming_size(5000, 5000), ResizeSpec(), FilterSpec(), 10**6, "jpg", 90)
    assert e.value.code == "too_many_pixels" and "5000x5000" in str(e.value)


# -- small pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize("samples_per_shard", [1, 7, 10, 1000, 1001])
def test_keys_match_img2dataset(samples_per_shard):
    from img2dataset.downloader import compute_key

    digits = key_digits(samples_per_shard)
    for shard, index in [(0, 0), (3, samples_per_shard - 1), (12345, samples_per_shard // 2)]:
        assert sample_key(shard, index, digits) == compute_key(index, shard, digits, 5)


def test_shard_tar_layout_matches_img2dataset_writer(tmp_path):
    """The same samples through the builder's shard writer and img2dataset's own webdataset writer: the same
    member names in the same order with the same mode and owner; the builder's is USTAR (no pax headers)."""
    from img2dataset.writer import WebDatasetSampleWriter

    from clipforge.pipeline.imaging import EncodedImage
    from clipforge.pipeline.layout import OutputLayout
    from clipforge.pipeline.sample import InputRow, RowOutcome
    from clipforge.pipeline.shard_writer import ShardWriter

    samples = [(sample_key(2, i, 1), encode_image(pattern_image(20 + i, 10, i), "jpg"), f"caption {i}")
               for i in range(3)]
    layout = OutputLayout(str(tmp_path / "ours"))
    layout.make_dirs()
    ours = ShardWriter(layout, 2, "jpg", 1, [])
    for i, (_key, jpg, caption) in enumerate(samples):
        image = EncodedImage(jpg, 20 + i, 10, 20 + i, 10, hashlib.sha256(jpg).hexdigest())
        ours.add(RowOutcome(InputRow(row=i, url=f"http://example.com/{i}.jpg", caption=caption), i, "ok", image=image))
    ours.commit()
    (tmp_path / "theirs").mkdir()
    theirs = WebDatasetSampleWriter(2, str(tmp_path / "theirs"), True, 5, pa.schema([("key", pa.string())]), "jpg")
    for key, jpg, caption in samples:
        theirs.write(jpg, key, caption, {"key": key})
    theirs.close()

    def members(path: Path) -> list[tuple]:
        with tarfile.open(path) as tar:
            return [(m.name, m.mode, m.uname, m.gname, m.type) for m in tar.getmembers()]

    assert members(tmp_path / "ours" / "00002.tar") == members(tmp_path / "theirs" / "00002.tar")
    assert [m[0] for m in members(tmp_path / "ours" / "00002.tar")][:3] == ["000020.jpg", "000020.json", "000020.txt"]
    raw = (tmp_path / "ours" / "00002.tar").read_bytes()
    with tarfile.open(tmp_path / "ours" / "00002.tar") as tar:
        assert all(raw[m.offset + 257 : m.offset + 265] == b"ustar\x0000" for m in tar.getmembers())
    assert b"PaxHeader" not in raw


def test_robots_directives_respect_crawler_scope():
    me = user_agent_token("clipforge/0.1 (+https://github.com/clipforge)")
    assert me == "clipforge"
    assert opted_out(["noai"], me) == "noai"
    assert opted_out(["noindex, nofollow"], me) == "noindex"
    assert opted_out(["otherbot: noimageai"], me) is None
    assert opted_out(["clipforge: noimageindex"], me) == "noimageindex"
    assert opted_out(["unavailable_after: 25 Jun 2010 15:00:00 PST", "nofollow"], me) is None


def test_url_targets():
    t = parse_target("https://Bücher.example:8443/a b/c.jpg?x=1 2#frag")
    assert (t.scheme, t.host, t.port) == ("https", "xn--bcher-kva.example", 8443)
    assert t.host_header == "xn--bcher-kva.example:8443"
    assert t.request_target == "/a%20b/c.jpg?x=1%202"
    assert parse_target("http://[::1]/x").host_header == "[::1]"
    for bad in ["ftp://example.com/a.jpg", "http:///nohost", "example.com/a.jpg", "http://h:99999/"]:
        with pytest.raises(InvalidURL):
            parse_target(bad)
