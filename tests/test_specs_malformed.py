"""Malformed specs through the real command line (`clipforge validate FILE`): every one exits non-zero with
one `error:` line naming the field or line at fault, and never a traceback.

Most cases run the CLI's main function in this process (captured output); a handful run
`python -m clipforge validate` in a fresh process.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipforge.cli import app
from spec_fixtures import TRAIN_YAML

TRAIN = TRAIN_YAML

BUILD = """\
kind: build
input:
  path: urls.csv
output:
  path: /tmp/shards
  image_format: jpg
resize:
  size: 64
download:
  retries: 1
"""

EVAL = """\
kind: eval
storage: /tmp/out
model: {name: tiny}
tasks:
  - task: retrieval
    dataset: d
    shards: [/tmp/shards]
"""

SWEEP = """\
kind: sweep
name: s
storage: /tmp/sweep
base: base.yaml
grid:
  optim.lr: [0.1, 0.01]
  data.batch_size: [8, 16]
"""


def sweep(old: str, new: str) -> dict:
    return {"spec.yaml": SWEEP.replace(old, new), "base.yaml": TRAIN}


# id -> (files to write (spec.yaml is validated), extra CLI args, texts the one error line must hold)
CASES = {
    # wrong types
    "float-is-a-word": ({"spec.yaml": TRAIN.replace("lr: 0.001", "lr: fast")}, [],
                        ["spec.yaml:10:", "field `optim.lr`", "valid number", "'fast'"]),
    "int-is-a-word": ({"spec.yaml": TRAIN.replace("batch_size: 8", "batch_size: eight")}, [],
                      ["spec.yaml:8:", "field `data.batch_size`", "valid integer"]),
    "list-is-a-string": ({"spec.yaml": TRAIN.replace("shards: [/tmp/shards]", "shards: /tmp/shards")}, [],
                         ["spec.yaml:7:", "field `data.shards`", "valid list"]),
    "section-is-a-number": ({"spec.yaml": TRAIN.replace("optim:\n  lr: 0.001", "optim: 5")}, [],
                            ["spec.yaml:9:", "field `optim`"]),
    "bool-is-a-word": ({"spec.yaml": TRAIN + "tensorboard: maybe\n"}, [],
                       ["spec.yaml:13:", "field `tensorboard`", "valid boolean"]),
    "build-timeout-is-a-word": ({"spec.yaml": BUILD.replace("retries: 1", "timeout_s: soon")}, [],
                                ["spec.yaml:10:", "field `download.timeout_s`", "'soon'"]),
    # unknown fields
    "unknown-top-level-field": ({"spec.yaml": TRAIN + "epochs: 3\n"}, [],
                                ["spec.yaml:13:", "field `epochs`", "unknown field"]),
    "unknown-nested-field": ({"spec.yaml": TRAIN.replace("lr: 0.001", "lrr: 0.001")}, [],
                             ["spec.yaml:10:", "field `optim.lrr`", "unknown field"]),
    "misspelt-section": ({"spec.yaml": TRAIN.replace("scaling:", "scalling:")}, [],
                         ["spec.yaml:11:", "field `scalling`", "unknown field"]),
    # missing required fields
    "missing-storage": ({"spec.yaml": TRAIN.replace("storage: /tmp/run\n", "")}, [],
                        ["field `storage`", "required field is missing"]),
    "missing-model": ({"spec.yaml": TRAIN.replace("model:\n  name: tiny\n", "")}, [],
                      ["field `model`", "required field is missing"]),
    "missing-build-input": ({"spec.yaml": BUILD.replace("input:\n  path: urls.csv\n", "")}, [],
                            ["field `input`", "required field is missing"]),
    "missing-shards-and-sources": ({"spec.yaml": TRAIN.replace("  shards: [/tmp/shards]\n", "")}, [],
                                   ["spec.yaml:6:", "field `data`", "data.shards and data.sources"]),
    # bad enums
    "bad-loss-kind": ({"spec.yaml": TRAIN + "loss: {kind: triplet}\n"}, [],
                      ["spec.yaml:13:", "field `loss.kind`", "'clip'", "'triplet'"]),
    "bad-strategy": ({"spec.yaml": TRAIN + "strategy: zero\n"}, [], ["spec.yaml:13:", "field `strategy`", "'ddp'"]),
    "bad-image-format": ({"spec.yaml": BUILD.replace("image_format: jpg", "image_format: gif")}, [],
                         ["spec.yaml:6:", "field `output.image_format`", "'webp'"]),
    "bad-eval-task": ({"spec.yaml": EVAL.replace("task: retrieval", "task: captioning")}, [],
                      ["spec.yaml:5:", "field `tasks.0.task`", "unknown task 'captioning'", "'retrieval'"]),
    "missing-eval-task": ({"spec.yaml": EVAL.replace("task: retrieval", "name: retrieval")}, [],
                          ["spec.yaml:5:", "field `tasks.0.task`", "missing `task`"]),
    # negative or zero sizes
    "negative-workers": ({"spec.yaml": TRAIN.replace("workers: 2", "workers: -2")}, [],
                         ["spec.yaml:12:", "field `scaling.workers`", "greater than or equal to 1"]),
    "negative-cpus": ({"spec.yaml": TRAIN + "  cpus_per_worker: -1\n"}, [],
                      ["spec.yaml:13:", "field `scaling.cpus_per_worker`", "greater than 0"]),
    "zero-batch": ({"spec.yaml": TRAIN.replace("batch_size: 8", "batch_size: 0")}, [],
                   ["spec.yaml:8:", "field `data.batch_size`"]),
    "negative-image-size": ({"spec.yaml": BUILD.replace("size: 64", "size: -5")}, [],
                            ["spec.yaml:8:", "field `resize.size`"]),
    "negative-retries": ({"spec.yaml": BUILD.replace("retries: 1", "retries: -1")}, [],
                         ["spec.yaml:10:", "field `download.retries`"]),
    "zero-recall-k": ({"spec.yaml": EVAL + "    recall_k: [1, 0]\n"}, [], ["spec.yaml:8:", "field `tasks.0.recall_k`"]),
    # YAML syntax
    "unclosed-bracket": ({"spec.yaml": TRAIN.replace("[/tmp/shards]", "[/tmp/shards")}, [],
                         ["spec.yaml:", "invalid YAML"]),
    "bad-indentation": ({"spec.yaml": TRAIN.replace("  lr: 0.001", "  lr: 0.001\n    beta1: 0.8")}, [],
                        ["spec.yaml:11:", "invalid YAML"]),
    "tab-indentation": ({"spec.yaml": TRAIN.replace("  lr: 0.001", "\tlr: 0.001")}, [],
                        ["spec.yaml:10:", "invalid YAML"]),
    "empty-file": ({"spec.yaml": ""}, [], ["spec.yaml", "empty"]),
    "a-list-not-a-mapping": ({"spec.yaml": "- kind: train\n"}, [], ["spec.yaml", "must be a YAML mapping"]),
    # YAML tags that would build Python objects
    "python-apply-tag": ({"spec.yaml": TRAIN.replace("name: t\n", "name: !!python/object/apply:os.system ['true']\n")},
                         [], ["spec.yaml:2:", "YAML tag not allowed"]),
    "python-name-tag": ({"spec.yaml": TRAIN + "seed: !!python/name:os.system\n"}, [],
                        ["spec.yaml:13:", "YAML tag not allowed"]),
    "python-new-tag": ({"spec.yaml": TRAIN + "seed: !!python/object/new:subprocess.Popen [[ls]]\n"}, [],
                       ["spec.yaml:13:", "YAML tag not allowed"]),
    # duplicate keys
    "duplicate-top-level-key": ({"spec.yaml": TRAIN + "name: again\n"}, [], ["spec.yaml:13:", "duplicate key `name`"]),
    "duplicate-nested-key": ({"spec.yaml": TRAIN.replace("  lr: 0.001", "  lr: 0.001\n  lr: 0.002")}, [],
                             ["spec.yaml:11:", "duplicate key `lr`"]),
    # kinds
    "unknown-kind": ({"spec.yaml": TRAIN.replace("kind: train", "kind: trian")}, [],
                     ["spec.yaml:1:", "field `kind`", "unknown kind 'trian'", "sweep"]),
    "missing-kind": ({"spec.yaml": TRAIN.replace("kind: train\n", "")}, [], ["field `kind`", "missing `kind`"]),
    # unreadable paths: the spec file itself and a sweep's base spec must exist and be text
    "spec-file-missing": ({}, [], ["spec.yaml", "spec file not found"]),
    "spec-file-is-a-folder": ({"spec.yaml/x": "x"}, [], ["spec.yaml", "is a folder"]),
    "spec-file-is-binary": ({"spec.yaml": b"\xff\xfe\x00kind"}, [], ["spec.yaml", "cannot read spec file"]),
    "sweep-base-missing": ({"spec.yaml": SWEEP}, [], ["spec.yaml:4:", "field `base`", "base.yaml", "not found"]),
    "sweep-base-is-a-folder": ({"spec.yaml": SWEEP, "base.yaml/x": "x"}, [],
                               ["spec.yaml:4:", "field `base`", "is a folder"]),
    # sweeps
    "sweep-unknown-field-in-grid": (sweep("optim.lr:", "optim.lrr:"), [],
                                    ["spec.yaml:6:", "every child (4)", "field `optim.lrr`", "unknown field"]),
    "sweep-reserved-storage": (sweep("optim.lr:", "storage:"), [],
                               ["spec.yaml:6:", "field `grid.storage`", "cannot be swept"]),
    "sweep-reserved-kind": (sweep("optim.lr:", "kind:"), [], ["spec.yaml:6:", "field `grid.kind`", "cannot be swept"]),
    "sweep-grid-and-list": (sweep("grid:", "list: [{optim.lr: 0.1}]\ngrid:"), [],
                            ["spec.yaml", "exactly one of `grid`", "`list`"]),
    "sweep-neither-grid-nor-list": ({"spec.yaml": SWEEP.split("grid:")[0], "base.yaml": TRAIN}, [],
                                    ["exactly one of `grid`"]),
    "sweep-empty-axis": (sweep("[0.1, 0.01]", "[]"), [], ["spec.yaml:6:", "field `grid.optim.lr`", "at least 1"]),
    "sweep-axis-not-a-list": (sweep("[0.1, 0.01]", "0.1"), [], ["spec.yaml:6:", "field `grid.optim.lr`", "valid list"]),
    "sweep-bad-field-path": (sweep("optim.lr:", "optim..lr:"), [],
                             ["spec.yaml:6:", "field `grid.optim..lr`", "not a field path"]),
    "sweep-duplicate-value": (sweep("[0.1, 0.01]", "[0.1, 0.1]"), [],
                              ["spec.yaml:6:", "field `grid.optim.lr`", "listed twice"]),
    "sweep-bad-child-value": (sweep("[8, 16]", "[8, -16]"), [],
                              ["spec.yaml:7:", "children lr0.1-bs-16, lr0.01-bs-16", "field `data.batch_size`"]),
    "sweep-base-is-a-sweep": ({"spec.yaml": SWEEP, "base.yaml": SWEEP}, [],
                              ["base.yaml:1:", "field `kind`", "kind 'sweep'", "build, train, eval"]),
    "sweep-zero-concurrency": (sweep("name: s", "name: s\nmax_concurrent: 0"), [],
                               ["spec.yaml:3:", "field `max_concurrent`"]),
    "sweep-missing-storage": (sweep("storage: /tmp/sweep\n", ""), [], ["field `storage`", "required field"]),
    # command-line overrides
    "override-without-value": ({"spec.yaml": TRAIN}, ["optim.lr"], ["override `optim.lr`", "FIELD=VALUE"]),
    "override-into-a-value": ({"spec.yaml": TRAIN}, ["optim.lr.x=1"], ["override `optim.lr.x=1`", "`optim.lr`",
                                                                         "not a section"]),
}
IN_FRESH_PROCESS = {"float-is-a-word", "python-apply-tag", "duplicate-top-level-key", "unknown-kind",
                    "spec-file-missing", "sweep-unknown-field-in-grid", "sweep-bad-child-value"}


def write_files(folder: Path, files: dict) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return folder / "spec.yaml"


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len(IN_FRESH_PROCESS) >= 5 and IN_FRESH_PROCESS <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_spec_gives_one_clear_error(tmp_path, case):
    files, extra, needles = CASES[case]
    spec = write_files(tmp_path, files)
    if case in IN_FRESH_PROCESS:
        r = subprocess.run([sys.executable, "-m", "clipforge", "validate", str(spec), *extra],
                           capture_output=True, text=True, timeout=120)
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        r = CliRunner().invoke(app, ["validate", str(spec), *extra])
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        code, out, err = r.exit_code, r.stdout, r.stderr
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
