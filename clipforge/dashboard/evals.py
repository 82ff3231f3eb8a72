"""Eval result files (CLIP_benchmark style: dataset, model, pretrained, task, metrics, language) near a run.

An eval job's output folder holds one JSON per task plus `results.json` (all of them); a training
run may keep such results in `RUN/eval/` or `RUN/evals/` (optionally one folder level deeper, e.g.
`RUN/eval/<label>/`). Files that are not eval results are ignored.
"""
from __future__ import annotations

import json

from clipforge.dashboard.metrics_log import is_finite_number, merge_best
from clipforge.dashboard.tree import Entry, RunTree, join_rel
from clipforge.runtime.run_dir import EVAL_DIRS


def is_eval_result(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("metrics"), dict) and "dataset" in obj


def parse_eval_file(data: bytes) -> list[dict]:
    """The eval results in one JSON file (an object or a list of them); [] for anything else."""
    try:
        # CLIP_benchmark writes NaN for undefined metrics (acc5 with fewer than 5 classes).
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    items = obj if isinstance(obj, list) else [obj]
    return [r for r in items if is_eval_result(r)]


def result_metrics(result: dict) -> dict[str, float]:
    """`<dataset>/<metric>` -> value of one result (finite numbers only)."""
    dataset = str(result.get("dataset"))
    out = {}
    for k, v in result["metrics"].items():
        if is_finite_number(v):
            out[f"{dataset}/{k}"] = float(v)
    return out


def best_of(results: list[dict]) -> dict[str, float]:
    best: dict[str, float] = {}
    for r in results:
        merge_best(best, result_metrics(r))
    return best


def eval_files(tree: RunTree, run_id: str, entries: dict[str, Entry]) -> list[tuple[str, Entry]]:
    """(path, entry) of the JSON files that may hold eval results of a run, in a stable order."""
    found: list[tuple[str, Entry]] = []
    for sub in EVAL_DIRS:
        e = entries.get(sub)
        if e is None or not e.is_dir:
            continue
        base = join_rel(run_id, sub)
        for child in sorted(tree.listdir(base), key=lambda c: c.name):
            if child.is_dir:
                for f in sorted(tree.listdir(join_rel(base, child.name)), key=lambda c: c.name):
                    if not f.is_dir and f.name.endswith(".json"):
                        found.append((join_rel(base, child.name, f.name), f))
            elif child.name.endswith(".json"):
                found.append((join_rel(base, child.name), child))
    return found


def read_results(tree: RunTree, files: list[str]) -> list[dict]:
    """Every eval result in `files`, without repeats (a task's own file and results.json say the same)."""
    seen, out = set(), []
    for path in files:
        try:
            data = tree.read_bytes(path)
        except OSError:
            continue
        for r in parse_eval_file(data):
            key = json.dumps([r.get("dataset"), r.get("task"), r.get("model"), r.get("pretrained"),
                              path.rsplit("/", 1)[0]], default=str)
            if key not in seen:
                seen.add(key)
                out.append({**r, "file": path})
    return out
