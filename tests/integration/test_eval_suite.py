"""Suites: several models x several datasets in one job, the merged table, and worker-count independence."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from clipforge.eval.evaluator import result_filename, run_eval
from clipforge.eval.spec import EvalSpec, EvalTask
from clipforge.eval.tables import to_markdown
from clipforge.runtime.run_dir import read_eval_stats

torch.set_num_threads(1)

CLASSES = ["circle", "square", "stripe"]
MODELS = [{"name": "tiny", "init_seed": 3, "label": "seed3"}, {"name": "tiny", "init_seed": 4, "label": "seed4"}]


def _image(seed: int, cls: int | None = None, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (28, 28, 3), dtype=np.uint8)
    if cls is not None:
        pixels[4 + 8 * cls : 10 + 8 * cls] += 120
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    with wds.TarWriter(str(root / "caps-000000.tar")) as sink:
        for i in range(8):
            image = b"\x89PNG broken" if i == 5 else _image(i)
            sink.write({"__key__": f"s{i}", "png": image, "txt": f"image {i}\nthe {i}th picture\nnumber {i}"})
    for split, n in (("train", 6), ("test", 3)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for j in range(n):
                (root / split / name / f"{j}.png").write_bytes(_image(1000 * (split == "test") + 10 * c + j, c))
    return root


def _tasks(root) -> list[dict]:
    return [
        {"task": "zeroshot_retrieval", "dataset": "wds/caps", "shards": [str(root / "caps-000000.tar")],
         "recall_k": [1, 2]},
        {"task": "zeroshot_classification", "dataset": "shapes", "image_folder": str(root / "test"),
         "templates": "simple"},
        {"task": "linear_probe", "dataset": "shapes", "train": {"kind": "image_folder", "path": str(root / "train")},
         "test": {"kind": "image_folder", "path": str(root / "test")}, "weight_decays": [1e-3, 1e-1]},
    ]


def test_spec_forms(tmp_path):
    task = {"task": "retrieval", "dataset": "d", "shards": ["x.tar"]}
    single = EvalSpec.model_validate({"kind": "eval", "storage": "s", "model": {"name": "tiny"}, "tasks": [task]})
    assert [(m.name, label) for m, label in single.model_entries()] == [("tiny", "clipforge")]
    suite = EvalSpec.model_validate({"kind": "eval", "storage": "s", "models": MODELS, "tasks": [task]})
    entries = suite.model_entries()
    assert [(m.init_seed, label) for m, label in entries] == [(3, "seed3"), (4, "seed4")]
    assert type(entries[0][0]).__name__ == "ModelSpec" and "label" not in entries[0][0].model_dump()
    with pytest.raises(ValidationError, match="either `model`"):
        EvalSpec.model_validate({"kind": "eval", "storage": "s", "models": MODELS, "model": {"name": "tiny"},
                                 "tasks": [task]})
    with pytest.raises(ValidationError, match="either `model`"):
        EvalSpec.model_validate({"kind": "eval", "storage": "s", "tasks": [task]})
    with pytest.raises(ValidationError, match="both 'tiny' labelled 'x'"):
        EvalSpec.model_validate({"kind": "eval", "storage": "s", "tasks": [task], "models": [
            {"name": "tiny", "label": "x"}, {"name": "tiny", "checkpoint": "c", "label": "x"}]})
    # Training's periodic evaluation takes only the tasks it can run.
    with pytest.raises(ValidationError):
        TypeAdapter(EvalTask).validate_python({"task": "linear_probe", "dataset": "d", "train": {}, "test": {}})


def test_suite_writes_a_file_per_model_dataset_task_and_one_table(ray_local, data, tmp_path):
    storage = tmp_path / "out"
    spec = EvalSpec.model_validate({"kind": "eval", "storage": str(storage), "models": MODELS, "tasks": _tasks(data),
                                    "batch_size": 4, "scaling": {"workers": 2, "cpus_per_worker": 0.5}})
    results = run_eval(spec)
    assert [(r["pretrained"], r["dataset"], r["task"]) for r in results] == [
        (m["label"], t["dataset"], t["task"]) for m in MODELS for t in _tasks(data)]
    for r in results:
        on_disk = json.loads((storage / result_filename(r["dataset"], r["pretrained"], "tiny", r["task"])).read_text())
        assert set(on_disk) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert json.dumps(on_disk) == json.dumps(r)
    assert (storage / "wds_caps_seed4_tiny_en_zeroshot_retrieval.json").exists()
    retrieval = results[0]["metrics"]
    assert (retrieval["n_images"], retrieval["n_texts"], retrieval["n_failed"]) == (7, 21, 1)

    # The two models really differ, and each embedded its own images once for all three tasks.
    assert json.dumps([r["metrics"] for r in results[:3]]) != json.dumps([r["metrics"] for r in results[3:]])
    stats = read_eval_stats(str(storage))
    assert [s["images_embedded"] for s in stats] == [8 + 9 + 18, 8 + 9 + 18]

    with open(storage / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert list(rows[0])[:4] == ["model", "pretrained", "dataset", "task"]
    for row, r in zip(rows, results):
        assert (row["pretrained"], row["dataset"], row["task"]) == (r["pretrained"], r["dataset"], r["task"])
        for name in rows[0]:
            if name in ("model", "pretrained", "dataset", "task"):
                continue
            if name in r["metrics"]:
                value = r["metrics"][name]
                assert (math.isnan(float(row[name])) if value != value else float(row[name]) == value), name
            else:
                assert row[name] == "", name
    md = (storage / "results.md").read_text()
    assert md == to_markdown(results)
    assert md.count("\n") == 2 + 6 and "| tiny | seed3 | wds/caps | zeroshot_retrieval |" in md


def test_results_identical_with_one_and_two_workers(ray_local, data, tmp_path):
    outs = []
    for workers in (1, 2):
        spec = EvalSpec.model_validate({
            "kind": "eval", "storage": str(tmp_path / f"w{workers}"), "model": {"name": "tiny", "init_seed": 5},
            "tasks": _tasks(data)[:2], "batch_size": 3,
            "scaling": {"workers": workers, "cpus_per_worker": 0.5}})
        outs.append(run_eval(spec))
    assert json.dumps(outs[0]) == json.dumps(outs[1])
    assert outs[0][0]["metrics"]["n_failed"] == 1  # the corrupt sample is counted and skipped either way


def test_markdown_cells_keep_small_values_visible():
    results = [{"model": "m", "pretrained": "p", "dataset": "d", "task": "linear_probe",
                "metrics": {"acc1": 0.53125, "weight_decay": 1e-5, "val_acc1": 0.0, "loss": float("nan")}}]
    row = to_markdown(results).splitlines()[2]
    assert "| 0.5312 |" in row or "| 0.5313 |" in row
    assert "| 1.0e-05 |" in row and "| 0.0000 |" in row and "| nan |" in row
