"""An eval job's folder is a CLIP_benchmark results folder: `clip_benchmark build FOLDER` (its own CLI) reads it."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

from clipforge.eval.evaluator import result_filename, run_eval
from clipforge.eval.spec import EvalSpec
from clipforge.runtime.run_dir import LEGACY_EVAL_STATS_FILE, LEGACY_RESULTS_FILE, read_eval_results

from train_fixtures import write_eval_sets

CLIP_BENCHMARK = Path(sys.executable).with_name("clip_benchmark")


def _spec(storage: Path, shard: Path, folder: Path) -> EvalSpec:
    return EvalSpec.model_validate({
        "kind": "eval", "storage": str(storage), "models": [{"name": "tiny", "label": "seed1", "init_seed": 1}],
        "tasks": [
            # The spec's old name: read as CLIP_benchmark's zeroshot_retrieval.
            {"task": "retrieval", "dataset": "wds/val", "shards": [str(shard)], "recall_k": [1, 5]},
            {"task": "zeroshot_classification", "dataset": "colours", "image_folder": str(folder),
             "templates": "simple"},
        ],
        "batch_size": 4, "scaling": {"workers": 1, "cpus_per_worker": 0.5},
    })


def _as_written_before(storage: Path) -> None:
    """An eval folder as clipforge wrote it before: summaries as *.json, retrieval under the task's old name."""
    storage.mkdir()
    old = {"dataset": "wds/val", "model": "tiny", "pretrained": "seed1", "task": "retrieval",
           "metrics": {"image_retrieval_recall@1": 0.0}, "language": "en"}
    (storage / result_filename("wds/val", "seed1", "tiny", "retrieval")).write_text(json.dumps(old))
    (storage / LEGACY_RESULTS_FILE).write_text(json.dumps([old]))
    (storage / LEGACY_EVAL_STATS_FILE).write_text(json.dumps({"cache": None, "models": []}))


def test_clip_benchmark_build_reads_an_eval_folder(ray_local, tmp_path):
    shard, folder = write_eval_sets(tmp_path / "data")
    storage = tmp_path / "eval"
    _as_written_before(storage)  # the job adopts its old folder and leaves nothing CLIP_benchmark would misread
    results = run_eval(_spec(storage, shard, folder))
    assert [r["task"] for r in results] == ["zeroshot_retrieval", "zeroshot_classification"]
    assert (storage / "wds_val_seed1_tiny_en_zeroshot_retrieval.json").is_file()
    assert read_eval_results(str(storage)) == json.loads(json.dumps(results))

    out = subprocess.run([str(CLIP_BENCHMARK), "build", str(storage), "--output", str(tmp_path / "benchmark.csv")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "benchmark.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: row["task"])
    assert [(r["dataset"], r["task"], r["model_fullname"]) for r in rows] == [
        ("colours", "zeroshot_classification", "tiny seed1"), ("wds/val", "zeroshot_retrieval", "tiny seed1")]
    for row, result in zip(rows, sorted(results, key=lambda r: r["task"])):
        for name, value in result["metrics"].items():
            got = float(row[name])
            assert math.isnan(got) if value != value else got == float(value), name
