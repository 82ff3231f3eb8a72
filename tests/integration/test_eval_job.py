"""The eval job end to end on real files: WebDataset shards, an image folder, a local Ray, the `tiny` model."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from clipforge.eval.datasets import expand_shards, load_image_folder, load_retrieval_webdataset
from clipforge.eval.embed import embed_images, embed_texts
from clipforge.eval.evaluator import result_filename, run_eval
from clipforge.eval.metrics import retrieval_metrics, zeroshot_classifier, zeroshot_metrics
from clipforge.eval.spec import EvalSpec
from clipforge.models.spec import ModelSpec
from clipforge.runtime.output_folder import MARKER
from clipforge.runtime.run_dir import read_eval_results
from clipforge.specbase import Scaling

torch.set_num_threads(1)

MODEL = ModelSpec(name="tiny", init_seed=3)
CAPTIONS = [
    ["a red square"],
    ["a blue circle", "a round blue shape"],
    ["green stripes"],
    ["a yellow star", "a bright star"],
    ["noise"],  # the corrupt one below
    ["a purple triangle"],
    ["an orange dot"],
]
CORRUPT = 4
CLASSES = ["boot", "coat", "shirt"]


def _image_bytes(seed: int, fmt: str = "JPEG", size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2] = rng.integers(0, 256, 3, dtype=np.uint8)  # a flat half: images differ in layout too
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    shard_dir = root / "shards"
    shard_dir.mkdir()
    # Two shards so that folder expansion and cross-shard numbering are exercised.
    for shard, rows in (("a-000000.tar", range(0, 4)), ("a-000001.tar", range(4, 7))):
        with wds.TarWriter(str(shard_dir / shard)) as sink:
            for i in rows:
                image = b"\xff\xd8 this is not a jpeg" if i == CORRUPT else _image_bytes(i)
                sink.write({"__key__": f"{i:06d}", "jpg": image, "txt": "\n".join(CAPTIONS[i]) + "\n\n",
                            "json": {"row": i}})
    folder = root / "classes"
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for j in range(3):
            (folder / name / f"{j}.png").write_bytes(_image_bytes(100 + 10 * c + j, "PNG", size=(28, 28)))
    (folder / "coat" / "broken.png").write_bytes(b"\x89PNG truncated")
    (folder / "README.txt").write_text("not a class")  # a file beside the class folders is ignored
    return {"shards": shard_dir, "folder": folder, "root": root}


@pytest.fixture(scope="module")
def bundle():
    from clipforge.models import create_model

    b = create_model(MODEL)
    b.model.eval()
    return b


def _reference_image_embeddings(bundle, images: list[bytes]) -> np.ndarray:
    with torch.no_grad():
        x = torch.stack([bundle.preprocess_val(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        return F.normalize(bundle.model.encode_image(x), dim=-1).numpy()


# ---------------------------------------------------------------- loaders (no Ray)


def test_load_retrieval_webdataset_reads_every_caption(data):
    items, captions, caption_image = load_retrieval_webdataset([str(data["shards"])])
    assert [it["idx"] for it in items] == list(range(7))
    assert captions == [c for caps in CAPTIONS for c in caps]
    assert caption_image == [i for i, caps in enumerate(CAPTIONS) for _ in caps]
    assert items[0]["bytes"] == _image_bytes(0)
    # A glob and an explicit file list name the same shards.
    assert expand_shards([str(data["shards"] / "a-*.tar")]) == expand_shards([str(data["shards"])])
    assert len(expand_shards([str(data["shards"] / "a-000001.tar")])) == 1


def test_load_retrieval_webdataset_names_bad_samples(tmp_path):
    shard = tmp_path / "bad.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "ok", "png": _image_bytes(0, "PNG"), "txt": "fine"})
        sink.write({"__key__": "nocap", "png": _image_bytes(1, "PNG"), "json": {"a": 1}})
    with pytest.raises(ValueError, match=r"bad\.tar: sample 'nocap' has no \.txt caption"):
        load_retrieval_webdataset([str(shard)])
    with pytest.raises(ValueError, match="no such file or folder"):
        load_retrieval_webdataset([str(tmp_path / "missing.tar")])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(ValueError, match="junk.tar: not a readable tar shard"):
        load_retrieval_webdataset([str(tmp_path / "junk.tar")])


def test_load_image_folder(data, tmp_path):
    items, labels, classes = load_image_folder(str(data["folder"]))
    assert classes == CLASSES
    assert labels == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert [it["idx"] for it in items] == list(range(10))
    assert items[3]["path"].endswith("coat/0.png") and items[6]["path"].endswith("coat/broken.png")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class folder 'empty_class' holds no images"):
        load_image_folder(str(tmp_path))


# ---------------------------------------------------------------- Ray Data embedding


def test_embed_images_same_with_one_and_two_workers_and_skips_corrupt(ray_local, data, bundle):
    items, _, _ = load_retrieval_webdataset([str(data["shards"])])
    one, failed_one = embed_images(MODEL, items, batch_size=2, scaling=Scaling(workers=1, cpus_per_worker=0.5))
    two, failed_two = embed_images(
        MODEL, items, batch_size=3, scaling=Scaling(workers=2, cpus_per_worker=0.5), preprocess=bundle.preprocess_val
    )
    assert failed_one == failed_two == [CORRUPT]
    assert one.dtype == np.float32 and one.shape[0] == 6
    np.testing.assert_allclose(one, two, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    # Ordered by idx: row r is the r-th decodable image, as embedded in this process.
    good = [it["bytes"] for it in items if it["idx"] != CORRUPT]
    np.testing.assert_allclose(one, _reference_image_embeddings(bundle, good), atol=1e-5)


# ---------------------------------------------------------------- the job


def test_run_eval_end_to_end(ray_local, data, bundle, tmp_path):
    storage = tmp_path / "results"
    spec = EvalSpec(
        kind="eval",
        storage=str(storage),
        model=MODEL,
        model_label="untrained",
        tasks=[
            {"task": "retrieval", "dataset": "wds/toy", "shards": [str(data["shards"])], "recall_k": [1, 5]},
            {"task": "zeroshot_classification", "dataset": "toyclasses", "image_folder": str(data["folder"]),
             "templates": "simple"},
        ],
        batch_size=4,
        scaling=Scaling(workers=2, cpus_per_worker=0.5),
    )
    results = run_eval(spec)

    # The spec's `retrieval` is CLIP_benchmark's `zeroshot_retrieval` in results and file names.
    assert [r["task"] for r in results] == ["zeroshot_retrieval", "zeroshot_classification"]
    names = sorted(p.name for p in storage.iterdir())
    assert names == sorted([MARKER, "results.jsonl", "results.csv", "results.md", "eval_stats.jsonl", "spec.yaml",
                            "wds_toy_untrained_tiny_en_zeroshot_retrieval.json",
                            "toyclasses_untrained_tiny_en_zeroshot_classification.json"])
    for r in results:
        on_disk = json.loads((storage / result_filename(r["dataset"], "untrained", "tiny", r["task"])).read_text())
        assert set(on_disk) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert (on_disk["model"], on_disk["pretrained"], on_disk["language"]) == ("tiny", "untrained", "en")
        assert on_disk["dataset"] == r["dataset"] and on_disk["task"] == r["task"]
    saved = read_eval_results(str(storage))
    assert [s["dataset"] for s in saved] == ["wds/toy", "toyclasses"]

    # Retrieval: the corrupt image and its caption leave; metrics equal an in-process recomputation.
    ret = results[0]["metrics"]
    assert (ret["n_images"], ret["n_texts"], ret["n_failed"]) == (6, 8, 1)
    items, captions, caption_image = load_retrieval_webdataset([str(data["shards"])])
    kept = [i for i in range(7) if i != CORRUPT]
    image_emb = torch.from_numpy(_reference_image_embeddings(bundle, [items[i]["bytes"] for i in kept]))
    texts = [c for c, i in zip(captions, caption_image) if i != CORRUPT]
    rows = torch.tensor([kept.index(i) for i in caption_image if i != CORRUPT])
    want = retrieval_metrics(image_emb, embed_texts(bundle, texts), rows, ks=(1, 5))
    for key, value in want.items():
        assert ret[key] == pytest.approx(value, abs=1e-6), key
        assert 0.0 <= ret[key] <= 1.0

    # Zero-shot: 3 classes -> acc5 NaN (written as NaN, as CLIP_benchmark does); the broken PNG is skipped.
    zs = results[1]["metrics"]
    assert (zs["n_images"], zs["n_classes"], zs["n_failed"]) == (9, 3, 1)
    assert math.isnan(zs["acc5"]) and math.isnan(saved[1]["metrics"]["acc5"])
    paths = [it["path"] for it in load_image_folder(str(data["folder"]))[0] if not it["path"].endswith("broken.png")]
    image_emb = torch.from_numpy(_reference_image_embeddings(bundle, [open(p, "rb").read() for p in paths]))
    classifier = zeroshot_classifier(bundle.model, bundle.tokenizer, CLASSES, ["a photo of a {c}."])
    want = zeroshot_metrics(100.0 * image_emb @ classifier, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert zs["acc1"] == pytest.approx(want["acc1"]) and zs["mean_per_class_recall"] == pytest.approx(
        want["mean_per_class_recall"]
    )


def test_eval_spec_rejects_clashing_outputs_and_bad_classnames(data, tmp_path):
    task = {"task": "retrieval", "dataset": "same", "shards": ["x.tar"]}
    with pytest.raises(ValueError, match="both run zeroshot_retrieval on dataset 'same'"):
        EvalSpec(kind="eval", storage=str(tmp_path), model=MODEL, tasks=[task, task])
    spec = EvalSpec(
        kind="eval", storage=str(tmp_path), model=MODEL,
        tasks=[{"task": "zeroshot_classification", "dataset": "c", "image_folder": str(data["folder"]),
                "classnames": ["only", "two"]}],
    )
    with pytest.raises(ValueError, match="2 classnames given but .* has 3 class folders"):
        run_eval(spec)
