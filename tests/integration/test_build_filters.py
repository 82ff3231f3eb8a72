"""Post-download filters (near duplicates, CLIP score) and per-host rate limits of the dataset builder."""
from __future__ import annotations

import io
import itertools
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from clipforge.demo.http_server import serve_directory
from clipforge.pipeline.build import run_build
from clipforge.pipeline.phash import NearDuplicateIndex, from_hex, hamming, phash
from clipforge.pipeline.ratelimit import TokenBucket
from clipforge.pipeline.spec import BuildSpec

from build_outputs import manifest_by_row, tar_members, write_url_list
from http_fixtures import ImageServer, _Handler


def smooth_noise(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct natural-looking picture per seed: blurred colour noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_spec(inp: Path, out: Path, sps: int = 4, **sections) -> BuildSpec:
    raw = {
        "kind": "build",
        "name": "filters-test",
        "input": {"path": str(inp)},
        "output": {"path": str(out), "samples_per_shard": sps},
        "download": {"allow_private_networks": True, "timeout_s": 10.0, "retries": 0, "threads_per_worker": 4},
        "resize": {"size": 48, "mode": "border"},
        "scaling": {"workers": 2, "cpus_per_worker": 0.5},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return BuildSpec.model_validate(raw)


def file_times(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "stats.json"}


# -- perceptual hash ----------------------------------------------------------------------------


def test_phash_is_stable_under_resize_and_recompression_and_separates_pictures():
    base = [smooth_noise(s, (160, 120)) for s in range(12)]
    for img in base[:4]:
        h = phash(img)
        variants = [img.resize((80, 60)), Image.open(io.BytesIO(jpeg(img, 40))),
                    ImageEnhance.Brightness(img).enhance(1.1), img.resize((320, 240), Image.Resampling.LANCZOS)]
        assert max(hamming(h, phash(v)) for v in variants) <= 6
    distances = [hamming(phash(a), phash(b)) for a, b in itertools.combinations(base, 2)]
    assert min(distances) > 10 and 24 <= np.mean(distances) <= 40


@pytest.mark.parametrize("max_distance", [0, 3, 7, 10, 16])
def test_near_duplicate_index_agrees_with_brute_force(max_distance):
    rng = random.Random(max_distance)
    stored = [rng.getrandbits(64) for _ in range(400)]
    # Queries near some stored hashes (flipping up to max_distance + 2 bits), plus random ones.
    queries = []
    for _ in range(300):
        h = rng.choice(stored)
        for bit in rng.sample(range(64), rng.randint(0, max_distance + 2)):
            h ^= 1 << bit
        queries.append(h)
    queries += [rng.getrandbits(64) for _ in range(50)]
    index = NearDuplicateIndex(max_distance)
    for item, h in enumerate(stored):
        index.add(h, item)
    for q in queries:
        expected = next(((i, hamming(h, q)) for i, h in enumerate(stored) if hamming(h, q) <= max_distance), None)
        assert index.find(q) == expected


# -- near-duplicate filter in a build -----------------------------------------------------------


@pytest.fixture
def picture_site(tmp_path):
    """Distinct pictures and near copies of some of them, served over HTTP; yields (rows, expectations)."""
    root = tmp_path / "site"
    root.mkdir()
    files = {}
    for s in range(8):
        files[f"p{s}.jpg"] = jpeg(smooth_noise(100 + s))
    files["p1-small.jpg"] = jpeg(smooth_noise(101).resize((48, 36)), 70)  # resized + recompressed copy of p1
    buf = io.BytesIO()
    smooth_noise(101).save(buf, format="PNG")
    files["p1.png"] = buf.getvalue()  # the same picture as PNG
    files["p4-bright.jpg"] = jpeg(ImageEnhance.Brightness(smooth_noise(104)).enhance(1.08))
    files["p4-again.jpg"] = files["p4-bright.jpg"]  # byte-identical to another near copy
    for name, data in files.items():
        (root / name).write_bytes(data)
    with serve_directory(root) as base:
        names = ["p0.jpg", "p1.jpg", "p2.jpg", "p1-small.jpg", "p3.jpg", "p4.jpg", "p1.png", "p5.jpg",
                 "p4-bright.jpg", "p6.jpg", "p4-again.jpg", "p7.jpg"]
        rows = [(f"{base}/{n}", f"picture {n}") for n in names]
        expected = {3: ("near_duplicate", 1), 6: ("near_duplicate", 1), 8: ("near_duplicate", 5),
                    10: ("duplicate", 8)}
        yield rows, expected


def test_near_duplicates_are_dropped_after_exact_ones_and_shards_rewritten(ray_local, tmp_path, picture_site):
    rows, expected = picture_site
    out = tmp_path / "out"
    spec = make_spec(write_url_list(tmp_path / "urls.parquet", rows), out,
                     filters={"dedup_exact": True, "near_dup_max_distance": 8})
    stats = run_build(spec, progress=False)

    got = manifest_by_row(out)
    for row, rec in got.items():
        if row in expected:
            code, first = expected[row]
            assert rec["status"] == code and f"row {first}" in rec["error"] and rec["key"] is None, rec
        else:
            assert rec["status"] == "ok", rec
    assert stats["status_counts"] == {"ok": 8, "near_duplicate": 3, "duplicate": 1}
    assert stats["near_dedup"]["near_duplicates_marked"] == 3 and stats["dedup"]["duplicates_marked"] == 1

    # The recorded hashes justify every decision: dropped rows are near their first, kept rows far apart.
    for row, (code, first) in expected.items():
        if code == "near_duplicate":
            assert hamming(from_hex(got[row]["phash"]), from_hex(got[first]["phash"])) <= 8
    kept = [from_hex(r["phash"]) for r in got.values() if r["status"] == "ok"]
    assert min(hamming(a, b) for a, b in itertools.combinations(kept, 2)) > 8
    # ...and match the stored pixels (hashes are of the image as stored, so they can be recomputed).
    stored = tar_members(out)
    assert sorted(stored) == sorted(r["key"] for r in got.values() if r["status"] == "ok")
    for rec in got.values():
        if rec["status"] == "ok":
            assert hamming(phash(Image.open(io.BytesIO(stored[rec["key"]]["jpg"]))), from_hex(rec["phash"])) <= 4

    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).to_pylist()
    by_row = {r["row"]: r for r in table}
    assert by_row[3]["status"] == "filtered" and by_row[3]["error_message"].startswith("near_duplicate: ")
    shard_stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["successes"] for s in shard_stats) == 8 and sum(s["filtered"] for s in shard_stats) == 4

    before = file_times(out)
    again = run_build(spec, progress=False)
    assert again["status_counts"] == stats["status_counts"] and again["near_dedup"]["near_duplicates_marked"] == 0
    assert file_times(out) == before


# -- CLIP-score filter ----------------------------------------------------------------------------


def independent_scores(out: Path, got: dict[int, dict]) -> dict[int, float]:
    """Cosine similarity of each stored sample under the tiny model, computed here without the builder."""
    import torch
    import torch.nn.functional as F

    from clipforge.models import ModelSpec, create_model

    bundle = create_model(ModelSpec(name="tiny"))
    stored = tar_members(out)
    scores = {}
    with torch.no_grad():
        for row, rec in got.items():
            s = stored[rec["key"]]
            img = bundle.preprocess_val(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).unsqueeze(0)
            a = F.normalize(bundle.model.encode_image(img).float(), dim=-1)
            b = F.normalize(bundle.model.encode_text(bundle.tokenizer([s["txt"].decode()])).float(), dim=-1)
            scores[row] = float((a * b).sum())
    return scores


def test_clip_score_filter_keeps_the_top_fraction_then_a_threshold(ray_local, tmp_path):
    import torch

    torch.set_num_threads(1)
    with ImageServer() as server:
        words = ["red", "green", "blue", "striped", "dotted", "plain", "bright", "dark", "small", "large"]
        rows = [(server.url(f"/img/{40 + 3 * i}x{30 + 2 * i}.jpg?seed={i}"), f"a {w} pattern")
                for i, w in enumerate(words)]
        rows.append((server.url("/status/404"), "missing"))
        inp = write_url_list(tmp_path / "urls.parquet", rows)

        plain = tmp_path / "plain"
        run_build(make_spec(inp, plain), progress=False)
        reference = independent_scores(plain, {r: m for r, m in manifest_by_row(plain).items() if m["status"] == "ok"})

        out = tmp_path / "top"
        clip = {"model": {"name": "tiny"}, "top_fraction": 0.35, "batch_size": 4, "workers": 2,
                "cpus_per_worker": 0.5}
        spec = make_spec(inp, out, filters={"clip_score": clip})
        stats = run_build(spec, progress=False)

        got = manifest_by_row(out)
        ok_rows = sorted(reference)
        for row in ok_rows:
            assert got[row]["clip_score"] == pytest.approx(reference[row], abs=1e-4)
        keep_n = math.ceil(0.35 * len(ok_rows))
        best = sorted(ok_rows, key=lambda r: (-reference[r], r))[:keep_n]
        assert sorted(r for r, m in got.items() if m["status"] == "ok") == sorted(best)
        dropped = [r for r, m in got.items() if m["status"] == "filtered_clip_score"]
        assert sorted(dropped) == sorted(set(ok_rows) - set(best))
        assert all("top_fraction 0.35 keeps 4" in got[r]["error"] and got[r]["key"] is None for r in dropped)
        assert got[10]["status"] == "http_404" and got[10]["clip_score"] is None
        assert stats["clip_score"] == {"scored": len(ok_rows), "dropped": len(ok_rows) - keep_n,
                                       "population": len(ok_rows)}
        assert sorted(tar_members(out)) == sorted(got[r]["key"] for r in best)

        # Re-running a finished build recomputes the same cut: nothing more is dropped or rewritten.
        before = file_times(out)
        again = run_build(spec, progress=False)
        assert again["status_counts"] == stats["status_counts"] and again["clip_score"]["dropped"] == 0
        assert file_times(out) == before

        # A threshold between two reference scores keeps exactly the rows at or above it.
        ordered = sorted(reference.values())
        threshold = round((ordered[4] + ordered[5]) / 2, 6)
        out2 = tmp_path / "threshold"
        run_build(make_spec(inp, out2, filters={"clip_score": {**clip, "top_fraction": None,
                                                               "threshold": threshold}}), progress=False)
        got2 = manifest_by_row(out2)
    assert sorted(r for r, m in got2.items() if m["status"] == "ok") == sorted(
        r for r, s in reference.items() if s >= threshold)
    assert all("below threshold" in m["error"] for m in got2.values() if m["status"] == "filtered_clip_score")


# -- per-host rate limit --------------------------------------------------------------------------


class _StampingHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        with self.server.lock:
            self.server.stamps.append((time.monotonic(), self.headers.get("Host", "").split(":")[0]))
        super().do_GET()


class StampingServer(ImageServer):
    """The fixture server, recording (arrival time, Host) of every request."""

    handler = _StampingHandler

    @property
    def stamps(self) -> list[tuple[float, str]]:
        return list(self._server.stamps)


def test_token_bucket_spaces_requests_after_the_burst():
    bucket = TokenBucket(rate=4.0, burst=2, now=0.0)
    waits = [bucket.reserve(0.0) for _ in range(5)]
    assert waits == [0.0, 0.0, 0.25, 0.5, 0.75]
    assert bucket.reserve(10.0) == 0.0  # refilled, but never beyond the burst
    assert bucket.reserve(10.0) == 0.0 and bucket.reserve(10.0) == 0.25


def test_per_host_rate_limit_holds_across_threads_and_tasks(ray_local, tmp_path):
    rps, per_host = 4.0, 12
    with StampingServer() as server:
        rows = []
        for i in range(per_host):  # the two hosts interleaved, so every shard task talks to both
            rows.append((server.url(f"/img/40x30.jpg?seed={i}", host="127.0.0.1"), f"a{i}"))
            rows.append((server.url(f"/img/30x40.jpg?seed={i}", host="localhost"), f"b{i}"))
        spec = make_spec(write_url_list(tmp_path / "urls.parquet", rows), tmp_path / "out", sps=6,
                         download={"per_domain_rps": rps, "threads_per_worker": 6})
        stats = run_build(spec, progress=False)
        stamps = server.stamps
    assert stats["status_counts"] == {"ok": 2 * per_host} and stats["shards"] == 4
    spans = []
    for host in ("127.0.0.1", "localhost"):
        times = sorted(t for t, h in stamps if h == host)
        assert len(times) == per_host
        # burst 1: requests arrive about 1/rps apart; allow scheduling jitter on a busy machine.
        gaps = np.diff(times)
        assert (len(times) - 1) / (times[-1] - times[0]) <= rps * 1.15, gaps
        assert np.median(gaps) >= 0.8 / rps, gaps
        # The bucket's own guarantee: request i is sent no sooner than (i - 1) / rps after the first (one token of
        # burst). Arrival stamps can bunch two requests when one was delayed in transit, so single gaps are not checked.
        assert all(t - times[0] >= (i - 1) / rps - 0.05 for i, t in enumerate(times)), gaps
        # No window of one second holds more than rps requests (+1 for jitter at the edges).
        assert max(sum(1 for t in times if s <= t < s + 1.0) for s in times) <= rps + 1
        spans.append((times[0], times[-1]))
    # The hosts have their own buckets: they were served side by side, not one after the other.
    overlap = min(spans[0][1], spans[1][1]) - max(spans[0][0], spans[1][0])
    assert overlap > 0.6 * (per_host - 1) / rps
