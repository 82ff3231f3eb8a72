"""The tiny demo end to end: real Debian data -> loopback HTTP -> build -> train (2 Ray workers) -> eval -> report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clipforge.demo.demo_report import RETRIEVAL_KEYS, ZEROSHOT_KEYS
from clipforge.runtime.run_dir import read_eval_results


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_demo_end_to_end(tmp_path, data_cache):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "clipforge", "demo", "--tiny", "--out", str(out), "--data-cache", str(data_cache)],
        capture_output=True, text=True, timeout=1150,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert f"report: {out / 'report.json'}" in r.stdout
    report = json.loads((out / "report.json").read_text())
    for which in ("untrained", "trained"):
        assert set(report[which]["retrieval"]) == set(RETRIEVAL_KEYS)
        assert set(report[which]["zeroshot"]) == set(ZEROSHOT_KEYS)
        assert set(report[which]["train"]) == {"steps", "samples_per_second", "wall_seconds"}
        for v in report[which]["retrieval"].values():
            assert 0.0 <= v <= 1.0
    assert report["trained"]["train"]["steps"] > 0
    assert report["checks"]["loss_went_down"], report["loss"]
    assert report["loss"]["last"] < report["loss"]["first"]
    assert (out / "loss.png").stat().st_size > 1000
    # Every stage left what a user would look for: shards, a manifest, checkpoints, metrics, CLIP_benchmark JSON.
    assert list((out / "shards" / "train").glob("*.tar"))
    assert list((out / "shards" / "train" / "manifest").glob("*.parquet"))
    assert list((out / "train" / "checkpoints").glob("*/meta.json"))
    assert (out / "train" / "metrics.jsonl").exists()
    results = read_eval_results(str(out / "eval" / "trained"))
    assert {r["task"] for r in results} == {"zeroshot_retrieval", "zeroshot_classification"}
    for spec in (out / "specs").glob("*.yaml"):
        v = subprocess.run([sys.executable, "-m", "clipforge", "validate", str(spec)], capture_output=True, text=True)
        assert v.returncode == 0, v.stderr
