"""The run directory: its file names, and the writers and readers of the files every job kind shares.

A training run's directory (the `storage` of a train spec) holds:
  spec.yaml      the spec, every default filled in (written when the run starts)
  spec_history.jsonl
                 one line per spec the run has trained under, oldest first: where each began (a re-run that
                 changes the spec adds one; read with `read_spec_history`)
  run.json       the few spec fields the dashboard's runs table shows (written with spec.yaml), so listing
                 thousands of runs reads a small JSON file per run instead of parsing YAML
  metrics.jsonl  one JSON object per logged step (MetricsLog)
  checkpoints/   one folder per checkpoint (step_NNNNNNNN, epoch_NNNN)
  tensorboard/   TensorBoard event files of the metrics
  workers/       rank_N.json: which process is rank N in the current attempt
  sample_keys.jsonl
                 with `debug.log_sample_keys`: the sample keys each rank trained on in each step, every
                 attempt's (read with `read_sample_keys`)
  summary.json   the run summary (written when the run ends)
  ray/           Ray Train's own state (local runs only)
An eval job's folder is a CLIP_benchmark results folder: one JSON per (dataset, model, task), named and shaped as
CLIP_benchmark's own, and no other *.json file (`clip_benchmark build FOLDER` reads every one); clipforge's own
summaries are JSON Lines beside them: results.jsonl (every result, one a line), eval_stats.jsonl (one line per
model), and the tables results.csv / results.md. Folders written before held results.json and eval_stats.json
instead. A training run may keep such results in eval/ or evals/. A build's folder ends with
stats.json. A sweep's folder holds sweep.json and one run directory per child; a child that failed gets
error.json.

Every name is defined here only; every job kind and the dashboard import them.
"""
from __future__ import annotations

import json
import math

import fsspec
import yaml

from clipforge.runtime.fs_files import is_local, join, read_json, write_json, write_text

SPEC_FILE = "spec.yaml"
SPEC_HISTORY_FILE = "spec_history.jsonl"
INDEX_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
WORKERS_DIR = "workers"
SAMPLE_KEYS_FILE = "sample_keys.jsonl"
RAY_DIR = "ray"

RESULTS_FILE = "results.jsonl"
RESULTS_CSV_FILE = "results.csv"
RESULTS_MD_FILE = "results.md"
EVAL_STATS_FILE = "eval_stats.jsonl"
# What eval folders written before held instead (a JSON list of every result; {"cache", "models": [...]}): *.json
# names, which `clip_benchmark build` takes for result files of its own.
LEGACY_RESULTS_FILE = "results.json"
LEGACY_EVAL_STATS_FILE = "eval_stats.json"
EVAL_RESULTS_FILES = (RESULTS_FILE, LEGACY_RESULTS_FILE)  # an eval job's all-results file, newest name first
EVAL_DIRS = ("eval", "evals")  # where a training run may keep eval results

BUILD_STATS_FILE = "stats.json"
SWEEP_FILE = "sweep.json"
ERROR_FILE = "error.json"  # written into a sweep child's run directory when it fails
FAILED_FILE = "FAILED"  # a failure marker the dashboard honours too, though clipforge itself writes error.json
FAILURE_FILES = (FAILED_FILE, ERROR_FILE)

# The file each job kind writes into its output folder once the job has completed.
FINISH_FILES = {"build": BUILD_STATS_FILE, "train": SUMMARY_FILE, "eval": RESULTS_FILE}

# Everything a training run writes at the top of its run directory, and the entries only a training run writes.
TRAIN_RUN_ENTRIES = (CHECKPOINTS_DIR, METRICS_FILE, SPEC_FILE, INDEX_FILE, SUMMARY_FILE, TENSORBOARD_DIR, WORKERS_DIR,
                     RAY_DIR, SAMPLE_KEYS_FILE, SPEC_HISTORY_FILE)
TRAIN_RUN_SIGNATURE = (SPEC_FILE, CHECKPOINTS_DIR)


# -- spec.yaml and its index run.json ---------------------------------------------------------------

# The fields of a spec that run.json holds: top-level scalars, and scalars of one section.
INDEX_FIELDS = ("kind", "name")
INDEX_SECTION = "model"
INDEX_SECTION_FIELDS = ("name", "trainable")
# Marks run.json as this index (a folder may hold another tool's file of that name); raised when its shape changes.
INDEX_VERSION = 1


def dump_spec(spec) -> str:
    """The spec as YAML, every default filled in (written into run directories)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def write_spec_yaml(storage: str, spec) -> None:
    """STORAGE/spec.yaml alone: for eval folders, where a run.json index would be one more `*.json` that
    CLIP_benchmark's `build` reads as a result."""
    write_text(join(storage, SPEC_FILE), dump_spec(spec))


def write_spec_files(storage: str, spec) -> None:
    """STORAGE/spec.yaml and its index STORAGE/run.json, written when a run starts."""
    write_text(join(storage, SPEC_FILE), dump_spec(spec))
    write_json(join(storage, INDEX_FILE), {"index_version": INDEX_VERSION,
                                           **spec_index(spec.model_dump(mode="json"))})


def _is_scalar(value) -> bool:
    return not isinstance(value, (dict, list))


def spec_index(spec_fields: dict) -> dict:
    """The index fields of a spec given as plain data (as a spec dumps or spec.yaml parses): kind, name and
    model.name / model.trainable, where they are scalars. Old and new runs go through this one function, so the
    dashboard shows them alike."""
    index = {k: spec_fields[k] for k in INDEX_FIELDS if k in spec_fields and _is_scalar(spec_fields[k])}
    section = spec_fields.get(INDEX_SECTION)
    if isinstance(section, dict):
        index[INDEX_SECTION] = {k: section[k] for k in INDEX_SECTION_FIELDS if k in section and _is_scalar(section[k])}
    return index


def read_index(data: bytes | str) -> dict | None:
    """The index fields in run.json's contents, or None when they are not a run index of this version (then the
    caller reads spec.yaml). Raises ValueError on broken JSON."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or obj.get("index_version") != INDEX_VERSION:
        return None
    return spec_index(obj)


def read_spec(storage: str) -> dict | None:
    """STORAGE/spec.yaml as plain data, or None when the run directory has none (or it is not a mapping)."""
    fs, p = fsspec.core.url_to_fs(join(storage, SPEC_FILE))
    if not fs.exists(p):
        return None
    with fs.open(p, "r", encoding="utf-8") as f:
        document = yaml.load(f.read(), Loader=_LOADER)  # a safe loader
    return document if isinstance(document, dict) else None


# -- spec_history.jsonl --------------------------------------------------------------------------------
#
# One JSON object per spec a training run has trained under, oldest first:
#   {"start_step": S, "time": T, "changed": ["field: recorded -> new", ...], "spec": {...every field...}}
# A run adds a line when it starts training under a spec that differs from the last line's (a fresh run: its first
# line, S = 0). spec.yaml always holds the newest spec; this file says which steps each spec trained.


def spec_history_path(storage: str) -> str:
    return join(storage, SPEC_HISTORY_FILE)


def read_spec_history(storage: str) -> list[dict]:
    """Every entry of STORAGE/spec_history.jsonl, oldest first ([] when the run has none); lines that are not JSON
    objects (cut off by a killed writer) are skipped."""
    fs, p = fsspec.core.url_to_fs(spec_history_path(storage))
    if not fs.exists(p):
        return []
    with fs.open(p, "r", encoding="utf-8") as f:
        return _json_objects(f.read())


def append_spec_history(storage: str, entry: dict) -> None:
    """Add `entry` as the last line of STORAGE/spec_history.jsonl. The file is rewritten whole: object stores
    cannot append, and it holds a line per spec change only."""
    lines = "".join(json.dumps(e) + "\n" for e in [*read_spec_history(storage), entry])
    write_text(spec_history_path(storage), lines)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVER = yaml.resolver.Resolver()
_NO_KEY = object()  # on a mapping's entry in _read_head's stack: its next scalar is a key
_MERGE_KEY = "<<"


class _NeedsDocument(Exception):
    """The head holds an alias or a merge key: only the whole document says what they stand for."""


def index_from_spec_yaml(text: str) -> dict:
    """The index fields of a spec.yaml (runs written before run.json existed), as yaml.safe_load reads them.
    Raises yaml.YAMLError on broken YAML.

    Reads the document as libyaml's event stream and stops once kind, name and the model section have been read:
    clipforge writes them first, and building the whole document would cost milliseconds per run, which is
    seconds for a folder of thousands of runs. An alias or merge key on the way builds the whole document.
    """
    try:
        return spec_index(_read_head(text))
    except _NeedsDocument:
        document = yaml.load(text, Loader=_LOADER)  # a safe loader, as _read_head's
        return spec_index(document) if isinstance(document, dict) else {}


def _read_head(text: str) -> dict:
    fields: dict = {}
    constructor = yaml.constructor.SafeConstructor()
    # One entry per open collection: [is a mapping, key awaiting its value (or _NO_KEY), key in the parent mapping].
    stack: list[list] = []
    section_read = False
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.DocumentEndEvent):
            break
        if isinstance(event, yaml.AliasEvent):
            raise _NeedsDocument
        if isinstance(event, yaml.CollectionStartEvent):
            in_parent = stack[-1][1] if stack and stack[-1][0] else _NO_KEY
            is_mapping = isinstance(event, yaml.MappingStartEvent)
            stack.append([is_mapping, _NO_KEY, in_parent])
            if len(stack) == 2 and in_parent == INDEX_SECTION and is_mapping:
                fields[INDEX_SECTION] = {}
        elif isinstance(event, yaml.CollectionEndEvent):
            closed = stack.pop()
            if stack and stack[-1][0]:
                # The collection was a key's value, or itself a key (`? [a, b]`) whose value comes next.
                stack[-1][1] = None if closed[2] is _NO_KEY else _NO_KEY
            section_read = section_read or (len(stack) == 1 and closed[2] == INDEX_SECTION)
        elif isinstance(event, yaml.ScalarEvent) and stack and stack[-1][0]:
            top = stack[-1]
            if top[1] is _NO_KEY:
                if event.value == _MERGE_KEY and len(stack) <= 2:
                    raise _NeedsDocument
                top[1] = event.value
                continue
            key, top[1] = top[1], _NO_KEY
            if len(stack) == 1 and key in (*INDEX_FIELDS, INDEX_SECTION):
                fields[key] = _scalar(constructor, event)
                section_read = section_read or key == INDEX_SECTION
            elif len(stack) == 2 and top[2] == INDEX_SECTION and key in INDEX_SECTION_FIELDS:
                fields[INDEX_SECTION][key] = _scalar(constructor, event)
        if section_read and all(k in fields for k in INDEX_FIELDS):
            break
    return fields


def _scalar(constructor: yaml.constructor.SafeConstructor, event: yaml.ScalarEvent):
    """The value yaml.safe_load gives this scalar: its tag resolved as PyYAML's composer does, then built by the
    safe constructor (which raises yaml.YAMLError for tags it does not build, as yaml.safe_load would)."""
    tag = event.tag
    if tag is None or tag == "!":
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    return constructor.construct_object(yaml.ScalarNode(tag, event.value, style=event.style))


# -- metrics.jsonl ------------------------------------------------------------------------------------

def metrics_path(storage: str) -> str:
    return join(storage, METRICS_FILE)


class MetricsLog:
    """Appends one JSON object per line. Object stores cannot append, so there the whole file is rewritten.

    A resumed run first drops the lines logged after its checkpoint's step (by the run that was cut
    off), so the log reads as one uninterrupted run.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        self.local = is_local(path)
        self.lines: list[str] = []
        fs, p = fsspec.core.url_to_fs(path)
        if resume_step is not None and fs.exists(p):
            with fs.open(p, "r", encoding="utf-8") as f:
                self.lines = [line for line in f.read().splitlines() if _step_of(line) <= resume_step]
        write_text(path, "".join(line + "\n" for line in self.lines))

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True)
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            return
        self.lines.append(line)
        write_text(self.path, "\n".join(self.lines) + "\n")


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf  # unreadable lines are dropped on resume


def read_metrics(storage: str) -> list[dict]:
    """Every record of STORAGE/metrics.jsonl, skipping lines that are not JSON objects (a half-written last line
    while the run is live)."""
    with fsspec.open(metrics_path(storage), "r", encoding="utf-8") as f:
        return _json_objects(f.read())


# -- sample_keys.jsonl -----------------------------------------------------------------------------------
#
# Written by rank 0 of a run with `debug.log_sample_keys` (clipforge.train.sample_keys), two kinds of lines:
#   {"attempt": ID, "start_step": S, "restarts": R, "time": T}   an attempt starts (fresh: S = 0; resumed: the
#                                                                 checkpoint's step)
#   {"attempt": ID, "step": N, "epoch": E, "rank": K, "keys": [...]}   the `__key__`s rank K trained on in step N
# Lines are only ever added: an attempt cut off by a failure keeps its lines after its last checkpoint, and the
# attempt that resumes from step S supersedes every earlier line of a step after S.


def sample_keys_path(storage: str) -> str:
    return join(storage, SAMPLE_KEYS_FILE)


def read_sample_key_lines(storage: str) -> list[dict]:
    """Every record of STORAGE/sample_keys.jsonl in file order, every attempt's, skipping lines that are not JSON
    objects (a line cut off by a killed writer)."""
    with fsspec.open(sample_keys_path(storage), "r", encoding="utf-8") as f:
        return _json_objects(f.read())


def read_sample_keys(storage: str) -> dict[int, list[str]]:
    """{step: the sorted sample keys all ranks trained on in that step}, as the run finally trained: for each step,
    the lines of the last attempt that ran it (an attempt resumed from step S drops earlier attempts' steps after S).
    A key that a step used twice appears twice."""
    by_step: dict[int, dict[int, list[str]]] = {}
    for record in read_sample_key_lines(storage):
        if "start_step" in record:
            start = int(record["start_step"])
            for step in [s for s in by_step if s > start]:
                del by_step[step]
        elif "keys" in record:
            by_step.setdefault(int(record["step"]), {})[int(record["rank"])] = [str(k) for k in record["keys"]]
    return {step: sorted(k for keys in ranks.values() for k in keys) for step, ranks in sorted(by_step.items())}


def _json_objects(text: str) -> list[dict]:
    """The lines of a JSON-lines text that are JSON objects (others: half-written or cut-off lines)."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# -- an eval job's results.jsonl and eval_stats.jsonl ------------------------------------------------------

def json_lines(records: list[dict]) -> str:
    """`records` as JSON Lines (NaN written as JSON `NaN`, as CLIP_benchmark writes undefined metrics)."""
    return "".join(json.dumps(r) + "\n" for r in records)


def _read_eval_file(folder: str, names: tuple[str, str]) -> tuple[str, str]:
    """(name, text) of the first of `names` (current, legacy) that `folder` holds."""
    fs, root = fsspec.core.url_to_fs(folder)
    for name in names:
        path = join(root, name)
        if fs.exists(path):
            with fs.open(path, "r", encoding="utf-8") as f:
                return name, f.read()
    raise FileNotFoundError(f"{folder} holds neither {names[0]} nor {names[1]}: not a finished eval job's folder")


def read_eval_results(folder: str) -> list[dict]:
    """Every result of the eval job whose folder is `folder`, in the order written (results.jsonl, or the JSON list
    in results.json of folders written before)."""
    name, text = _read_eval_file(folder, EVAL_RESULTS_FILES)
    return parse_eval_results(name, text)


def parse_eval_results(name: str, text: str) -> list:
    """The results in `text`, the contents of an eval job's all-results file called `name` (one of
    EVAL_RESULTS_FILES); for readers that fetch the file themselves (the dashboard reads through its own folder
    checks). A results.json that is not a JSON list gives what it holds, for the caller to check."""
    return _json_objects(text) if name == RESULTS_FILE else json.loads(text)


# The task names eval results carried before, and the name each stands for now (CLIP_benchmark's).
EVAL_TASK_ALIASES = {"retrieval": "zeroshot_retrieval"}


def eval_task_name(task: str) -> str:
    """The current name of an eval result's task, whichever name the result was written with."""
    return EVAL_TASK_ALIASES.get(task, task)


def read_eval_stats(folder: str) -> list[dict]:
    """One dict per model of the eval job whose folder is `folder`: what was embedded and what came from the cache
    (eval_stats.jsonl; in folders written before, eval_stats.json's `models`, each given its `cache`)."""
    name, text = _read_eval_file(folder, (EVAL_STATS_FILE, LEGACY_EVAL_STATS_FILE))
    if name == EVAL_STATS_FILE:
        return _json_objects(text)
    legacy = json.loads(text)
    return [{"cache": legacy.get("cache"), **m} for m in legacy.get("models", [])]


# -- summary.json ------------------------------------------------------------------------------------

def summary_path(storage: str) -> str:
    return join(storage, SUMMARY_FILE)


def write_summary(storage: str, summary: dict) -> None:
    write_json(summary_path(storage), summary)


def read_summary(storage: str) -> dict:
    return read_json(summary_path(storage))
