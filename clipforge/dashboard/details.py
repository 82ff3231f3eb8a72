"""Everything the run page shows about one run: spec, summary, metric records, eval results, checkpoints."""
from __future__ import annotations

import json

import yaml

from clipforge.dashboard.evals import result_table
from clipforge.dashboard.metrics_log import Chunk, parse_records
from clipforge.dashboard.runs import RunDir, as_mapping, run_eval_results
from clipforge.dashboard.tree import Entry, PathNotFound, RunTree, join_rel
from clipforge.runtime.run_dir import CHECKPOINTS_DIR, METRICS_FILE, SPEC_FILE, SUMMARY_FILE

CHECKPOINT_META = "meta.json"


def run_dir(tree: RunTree, run_id: str) -> RunDir:
    return RunDir(run_id, {e.name: e for e in tree.listdir(run_id)})


def read_metrics(tree: RunTree, run: RunDir, offset: int = 0) -> tuple[Chunk, bool]:
    """Records of the complete lines from byte `offset` on, and whether the client must start over.

    Starting over is needed when the file is now shorter than `offset` or the byte before `offset`
    is no longer a newline: the log was rewritten (a resumed run drops lines past its checkpoint).
    """
    entry = run.entries.get(METRICS_FILE)
    if entry is None or entry.is_dir:
        return Chunk([], 0, 0), offset > 0
    path = join_rel(run.id, METRICS_FILE)
    reset = False
    if offset > 0:
        data = tree.read_bytes(path, offset - 1)
        if not data.startswith(b"\n"):
            reset, offset = True, 0
            data = tree.read_bytes(path)
        else:
            data = data[1:]
    else:
        data = tree.read_bytes(path)
    return parse_records(data, offset), reset


def read_spec(tree: RunTree, run: RunDir) -> tuple[str | None, dict | None, str | None]:
    """(spec.yaml text, parsed spec, parse error)."""
    if SPEC_FILE not in run.entries:
        return None, None, None
    text = tree.read_text(join_rel(run.id, SPEC_FILE))
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return text, None, f"{SPEC_FILE}: {e}"
    return text, parsed if isinstance(parsed, dict) else None, None


def read_summary(tree: RunTree, run: RunDir) -> dict | None:
    if SUMMARY_FILE not in run.entries:
        return None
    try:
        obj = json.loads(tree.read_bytes(join_rel(run.id, SUMMARY_FILE)))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def list_checkpoints(tree: RunTree, run: RunDir) -> list[dict]:
    """Complete checkpoints (with meta.json) of a run, oldest step first."""
    e: Entry | None = run.entries.get(CHECKPOINTS_DIR)
    if e is None or not e.is_dir:
        return []
    base = join_rel(run.id, CHECKPOINTS_DIR)
    out = []
    try:
        children = tree.listdir(base)
    except (PathNotFound, OSError):
        return []
    for child in children:
        if not child.is_dir:
            continue
        path = join_rel(base, child.name)
        try:
            meta = json.loads(tree.read_bytes(join_rel(path, CHECKPOINT_META)))
        except (OSError, ValueError):
            continue  # still being written, or not a checkpoint
        if not isinstance(meta, dict):
            continue
        spec = as_mapping(meta.get("spec"))
        model = as_mapping(spec.get("model"))
        out.append({
            "id": path,
            "run": run.id,
            "name": child.name,
            "step": meta.get("step"),
            "epoch": meta.get("epoch"),
            "samples_seen": meta.get("samples_seen"),
            "loss": meta.get("loss"),
            "time": meta.get("time"),
            "model": model.get("name") or meta.get("model_name"),
        })
    out.sort(key=lambda c: (c["step"] if isinstance(c["step"], (int, float)) else -1, c["name"]))
    return out


def run_payload(tree: RunTree, run: RunDir, row: dict | None) -> dict:
    """The run page's data. `eval_table` holds one {model, dataset, task, metric, value, file} per score of the
    run's eval results (`model`: the model's label); `evals` the results as read."""
    chunk, _ = read_metrics(tree, run, 0)
    spec_text, spec, spec_error = read_spec(tree, run)
    evals = run_eval_results(tree, run)
    return {
        "id": run.id,
        "row": row,
        "spec_text": spec_text,
        "spec": spec,
        "spec_error": spec_error,
        "summary": read_summary(tree, run),
        "records": chunk.records,
        "offset": chunk.offset,
        "skipped_lines": chunk.skipped,
        "evals": evals,
        "eval_table": result_table(evals),
        "checkpoints": list_checkpoints(tree, run),
    }
