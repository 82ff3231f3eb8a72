"""Eval results near a run, each value keyed by (model label, dataset, task, metric).

An eval job's folder holds its all-results file (results.jsonl; results.json in folders written before, read
with clipforge.runtime.run_dir's parser) and one CLIP_benchmark JSON per (dataset, model, task); a training run
may keep such folders or files in `RUN/eval/` or `RUN/evals/` (optionally one folder level deeper, e.g.
`RUN/eval/<label>/`). Files that are not eval results are ignored.

The model label is CLIP_benchmark's `pretrained` field (an eval spec's `label`, e.g. `untrained` / `trained`):
results of different labels, datasets or tasks are never merged, so a linear probe's accuracy is not shown as a
zero-shot one, nor a trained model's as an untrained one's. Results written with the task's old name
(`retrieval`) are read under its current one (`zeroshot_retrieval`).

Eval lines logged during training (`eval/<dataset>/<metric>` in metrics.jsonl) carry neither a label nor a task:
they get the label TRAINING_LABEL and the task their metric belongs to (the trainer runs zero-shot
classification and retrieval only).
"""
from __future__ import annotations

import json

from clipforge.dashboard.metrics_log import is_finite_number
from clipforge.dashboard.tree import Entry, RunTree, join_rel
from clipforge.runtime.run_dir import EVAL_DIRS, EVAL_RESULTS_FILES, eval_task_name, parse_eval_results

# Joins the four parts of a key; the metric is the last part. Chosen to be readable in menus and unlike anything in
# dataset names (which hold `/`, as in `wds/mscoco`).
KEY_SEP = " · "
TRAINING_LABEL = "training (best)"  # eval lines of metrics.jsonl: the best value logged during training
RETRIEVAL_TASK = eval_task_name("retrieval")
CLASSIFICATION_TASK = "zeroshot_classification"


def eval_key(model: str, dataset: str, task: str, metric: str) -> str:
    return KEY_SEP.join((model, dataset, task, metric))


def key_parts(key: str) -> dict[str, str]:
    """{model, dataset, task, metric} of a key made by eval_key."""
    parts = key.split(KEY_SEP)
    if len(parts) < 4:
        return {"model": "", "dataset": "", "task": "", "metric": parts[-1]}
    return {"model": KEY_SEP.join(parts[:-3]), "dataset": parts[-3], "task": parts[-2], "metric": parts[-1]}


def metric_of(key: str) -> str:
    return key.rsplit(KEY_SEP, 1)[-1]


def is_score(metric: str) -> bool:
    """Counts (`n_images`, `n_classes`) are not scores: they are left out of keys, tables and bars."""
    return not metric.startswith("n_")


def is_eval_result(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("metrics"), dict) and "dataset" in obj


def model_label(result: dict) -> str:
    """The label a result's model carries: CLIP_benchmark's `pretrained`, else the model's name."""
    return str(result.get("pretrained") or result.get("model") or "")


def result_entries(result: dict) -> list[dict]:
    """One {model, dataset, task, metric, value} per score of one result (finite numbers only)."""
    label, dataset = model_label(result), str(result.get("dataset"))
    task = eval_task_name(str(result.get("task") or ""))
    return [{"model": label, "dataset": dataset, "task": task, "metric": str(k), "value": float(v)}
            for k, v in result["metrics"].items() if is_score(str(k)) and is_finite_number(v)]


def keyed_values(results: list[dict]) -> dict[str, float]:
    """eval_key -> value of every score of `results`; where two results give the same key (the same job's result
    read from two files), the first read counts."""
    out: dict[str, float] = {}
    for r in results:
        for e in result_entries(r):
            out.setdefault(eval_key(e["model"], e["dataset"], e["task"], e["metric"]), e["value"])
    return out


def training_task(metric: str) -> str:
    return RETRIEVAL_TASK if "retrieval" in metric else CLASSIFICATION_TASK


def training_keys(log_values: dict[str, float]) -> dict[str, float]:
    """The eval values of metrics.jsonl (`<dataset>/<metric>` -> value) under full keys."""
    out = {}
    for name, value in log_values.items():
        dataset, _, metric = name.rpartition("/")
        if is_score(metric):
            out[eval_key(TRAINING_LABEL, dataset, training_task(metric), metric)] = value
    return out


def parse_eval_file(name: str, data: bytes) -> list[dict]:
    """The eval results in one file: an all-results file (by its name) or a CLIP_benchmark JSON (an object, or a
    list of them); [] for anything else."""
    try:
        # CLIP_benchmark writes NaN for undefined metrics (acc5 with fewer than 5 classes).
        text = data.decode("utf-8")
        obj = parse_eval_results(name, text) if name in EVAL_RESULTS_FILES else json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return []
    items = obj if isinstance(obj, list) else [obj]
    return [r for r in items if is_eval_result(r)]


def is_eval_file_name(name: str) -> bool:
    return name.endswith(".json") or name in EVAL_RESULTS_FILES


def results_files(names: list[str]) -> list[str]:
    """The files of one folder to read results from: its all-results file where it has one (it holds every
    result, and the per-task files say the same), else every JSON file."""
    for name in EVAL_RESULTS_FILES:
        if name in names:
            return [name]
    return sorted(n for n in names if n.endswith(".json"))


def eval_files(tree: RunTree, run_id: str, entries: dict[str, Entry]) -> list[tuple[str, Entry]]:
    """(path, entry) of the files that may hold eval results of a run's eval folders, in a stable order."""
    found: list[tuple[str, Entry]] = []
    for sub in EVAL_DIRS:
        e = entries.get(sub)
        if e is None or not e.is_dir:
            continue
        base = join_rel(run_id, sub)
        children = {c.name: c for c in tree.listdir(base)}
        for child in sorted(children.values(), key=lambda c: c.name):
            if child.is_dir:
                files = {f.name: f for f in tree.listdir(join_rel(base, child.name)) if not f.is_dir}
                found += [(join_rel(base, child.name, n), files[n]) for n in results_files(list(files))]
        loose = [n for n, c in children.items() if not c.is_dir]
        found += [(join_rel(base, n), children[n]) for n in results_files(loose)]
    return found


def read_results(tree: RunTree, files: list[str]) -> list[dict]:
    """Every eval result in `files`, without repeats (a task's own file and the all-results file say the same),
    each with the `file` it was read from."""
    seen, out = set(), []
    for path in files:
        try:
            data = tree.read_bytes(path)
        except OSError:
            continue
        for r in parse_eval_file(path.rsplit("/", 1)[-1], data):
            key = json.dumps([r.get("dataset"), eval_task_name(str(r.get("task") or "")), r.get("model"),
                              r.get("pretrained"), path.rsplit("/", 1)[0]], default=str)
            if key not in seen:
                seen.add(key)
                out.append({**r, "file": path})
    return out


def result_table(results: list[dict]) -> list[dict]:
    """One {model, dataset, task, metric, value, file} per score of `results` (what the run page's table shows)."""
    return [{**e, "file": r.get("file")} for r in results for e in result_entries(r)]
