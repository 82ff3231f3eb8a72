"""The embedding cache: fingerprints, the store, and jobs that reuse tower features instead of embedding again."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipforge.eval.cache import FeatureStore, cache_key
from clipforge.eval.evaluator import run_eval
from clipforge.eval.fingerprint import describe_transform, digest_items, digest_tensors
from clipforge.eval.spec import EvalSpec
from clipforge.eval.tower_view import tower_view
from clipforge.models.spec import ModelSpec
from clipforge.runtime.run_dir import RESULTS_FILE, json_lines, read_eval_stats

torch.set_num_threads(1)

BASE = {"name": "tiny", "init_seed": 3}


def _png(seed: int, size=(30, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cachedata")
    with wds.TarWriter(str(root / "val-000000.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"{i:04d}", "png": _png(i), "txt": f"picture number {i}\nanother caption {i}"})
    for c, name in enumerate(["ant", "bee", "cat"]):
        (root / "classes" / name).mkdir(parents=True)
        for j in range(2):
            (root / "classes" / name / f"{j}.png").write_bytes(_png(50 + 10 * c + j))
    return root


def _tasks(data) -> list[dict]:
    return [{"task": "retrieval", "dataset": "val", "shards": [str(data / "val-000000.tar")], "recall_k": [1, 3]},
            {"task": "zeroshot_classification", "dataset": "abc", "image_folder": str(data / "classes"),
             "templates": ["a photo of a {c}.", "a {c}"]}]


def _spec(data, storage, cache, **model) -> EvalSpec:
    raw = {"kind": "eval", "storage": str(storage), "cache": cache and str(cache), "tasks": _tasks(data),
           "batch_size": 4, "scaling": {"workers": 2, "cpus_per_worker": 0.5}}
    if "models" in model:
        raw["models"] = model["models"]
    else:
        raw["model"] = {**BASE, **model}
    return EvalSpec.model_validate(raw)


def _stats(storage) -> list[dict]:
    return read_eval_stats(str(storage))


def _save_variant(path, change: str) -> str:
    """A checkpoint of the base model with its projection heads (or one trunk weight) changed."""
    from clipforge.models import create_model, save_checkpoint

    model = create_model(ModelSpec(**BASE)).model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if change == "heads":
            model.visual.proj.copy_(torch.randn(model.visual.proj.shape, generator=g) * 0.2)
            model.text_projection.copy_(torch.randn(model.text_projection.shape, generator=g) * 0.2)
        else:
            model.visual.conv1.weight.add_(0.05 * torch.randn(model.visual.conv1.weight.shape, generator=g))
    return save_checkpoint(str(path), model.state_dict(), {"step": 1})


# ---------------------------------------------------------------- fingerprints and the store


def test_tower_keys_follow_trunk_weights_not_heads(tmp_path):
    from clipforge.models import create_model

    base = tower_view(create_model(ModelSpec(**BASE)))
    heads = tower_view(create_model(ModelSpec(**BASE, checkpoint=_save_variant(tmp_path / "h", "heads"))))
    trunk = tower_view(create_model(ModelSpec(**BASE, checkpoint=_save_variant(tmp_path / "t", "trunk"))))
    assert base.kind == heads.kind == "trunk"
    assert (heads.image_key, heads.text_key) == (base.image_key, base.text_key)
    assert trunk.image_key != base.image_key and trunk.text_key == base.text_key
    other_seed = tower_view(create_model(ModelSpec(name="tiny", init_seed=4)))
    assert other_seed.image_key != base.image_key and other_seed.text_key != base.text_key


def test_digests_change_with_content():
    a = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    b = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    assert digest_tensors(a) == digest_tensors(b)
    b["w"][1, 2] += 1e-6
    assert digest_tensors(a) != digest_tensors(b)
    assert digest_tensors(a) != digest_tensors({"w": a["w"].reshape(3, 2), "n": a["n"]})
    assert digest_items([{"bytes": b"x"}]) != digest_items([{"bytes": b"y"}])
    assert describe_transform(lambda: 0) == describe_transform(lambda: 1)  # addresses dropped


def test_digest_of_files_follows_size_and_mtime(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png(0))
    before = digest_items([{"path": str(path)}])
    assert digest_items([{"path": str(path)}]) == before
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert digest_items([{"path": str(path)}]) != before


@pytest.mark.parametrize("root", ["local", "memory://clipforge-cache-test", None])
def test_store_round_trip_and_corrupt_entries(tmp_path, root, caplog):
    root = str(tmp_path / "cache") if root == "local" else root
    key = cache_key(what="image", tower="t", images="i")
    arrays = {"features": np.arange(12, dtype=np.float32).reshape(3, 4), "kept": np.array([0, 2, 3])}
    store = FeatureStore(root)
    assert store.get("image", key) is None
    store.put("image", key, arrays, meta={"images": "x"})
    again = FeatureStore(root).get("image", key)
    if root is None:
        assert again is None  # memory only: a new job starts empty
        return
    assert set(again) == {"features", "kept"}
    np.testing.assert_array_equal(again["features"], arrays["features"])
    fresh = FeatureStore(root)
    with fresh.fs.open(fresh._file("image", key), "wb") as f:
        f.write(b"PK\x03\x04 not a zip")
    with caplog.at_level("WARNING"):
        assert fresh.get("image", key) is None
    assert "unreadable entry" in caplog.text and fresh.counts["image_misses"] == 1


# ---------------------------------------------------------------- jobs


def test_second_run_reuses_features_and_heads_only_models_skip_the_towers(ray_local, data, tmp_path):
    cache = tmp_path / "cache"
    first = run_eval(_spec(data, tmp_path / "r1", cache))
    s1 = _stats(tmp_path / "r1")[0]
    n_prompts = 3 * 2
    assert (s1["images_embedded"], s1["images_from_cache"]) == (12, 0)
    assert (s1["texts_embedded"], s1["texts_from_cache"]) == (12 + n_prompts, 0)
    assert len(list((cache / "image").glob("*.npz"))) == 2 and len(list((cache / "text").glob("*.npz"))) == 2

    second = run_eval(_spec(data, tmp_path / "r2", cache))
    s2 = _stats(tmp_path / "r2")[0]
    assert (s2["images_embedded"], s2["images_from_cache"]) == (0, 12)
    assert (s2["texts_embedded"], s2["texts_from_cache"]) == (0, 12 + n_prompts)
    assert json.dumps(second) == json.dumps(first)  # identical metrics (NaN included)

    # A heads-only fine-tune shares both trunks: nothing is embedded. A changed image trunk embeds its
    # images again but still shares the text trunk's features.
    heads_ckpt = _save_variant(tmp_path / "heads", "heads")
    trunk_ckpt = _save_variant(tmp_path / "trunk", "trunk")
    suite = run_eval(_spec(data, tmp_path / "r3", cache, models=[
        {**BASE, "checkpoint": heads_ckpt, "label": "heads"}, {**BASE, "checkpoint": trunk_ckpt, "label": "trunk"}]))
    s_heads, s_trunk = _stats(tmp_path / "r3")
    assert (s_heads["images_embedded"], s_heads["texts_embedded"]) == (0, 0)
    assert (s_trunk["images_embedded"], s_trunk["texts_embedded"], s_trunk["texts_from_cache"]) == (12, 0, 18)

    # The cached trunk features through the new heads give what embedding from scratch gives.
    fresh = run_eval(_spec(data, tmp_path / "r4", None, checkpoint=heads_ckpt))
    assert _stats(tmp_path / "r4")[0]["images_embedded"] == 12
    for got, want in zip(suite[:2], fresh):
        assert got["pretrained"] == "heads" and got["dataset"] == want["dataset"]
        for key, value in want["metrics"].items():
            if value == value:
                assert got["metrics"][key] == pytest.approx(value, abs=1e-6), key
    # A job served wholly from the cache does not start Ray at all.
    script = textwrap.dedent(f"""
        import json, sys, time
        t0 = time.perf_counter()
        from clipforge.runtime.environment import apply_entry_point_defaults
        apply_entry_point_defaults()
        from clipforge.eval.evaluator import run_eval
        from clipforge.eval.spec import EvalSpec
        spec = EvalSpec.model_validate_json({_spec(data, tmp_path / "r5", cache).model_dump_json()!r})
        run_eval(spec)
        ray = sys.modules.get("ray")
        print(json.dumps({{"ray_started": bool(ray and ray.is_initialized()), "seconds": time.perf_counter() - t0}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["ray_started"] is False
    assert (tmp_path / "r5" / RESULTS_FILE).read_text() == json_lines(first)
