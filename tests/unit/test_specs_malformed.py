"""Malformed specs through the real command line (`clipforge validate FILE`): every one exits non-zero with
one `error:` line naming the field or line at fault, and never a traceback.

Most cases run the CLI's main function in this process (captured output); a handful run
`python -m clipforge validate` in a fresh process.
"""
from __future__ import annotations

import subprocess
import sys
import time
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


# A zero-shot task in place of EVAL's retrieval task, and a linear probe (line numbers as in EVAL).
RETRIEVAL = "  - task: retrieval\n    dataset: d\n    shards: [/tmp/shards]"
ZS_FROM = RETRIEVAL
ZS_TO = "  - task: zeroshot_classification\n    dataset: d\n    image_folder: /tmp/classes"
PROBE = "  - task: linear_probe\n    dataset: d\n    train: {path: /a}\n    test: {path: /b}"

# Nine anchors each listing the previous nine times: 9^9 strings if expanded (a "billion laughs").
ALIAS_BOMB = "bomb:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
# Few nodes, but each alias adds the depth of what it names: 20 anchors of depth 3 stack to 60 levels.
DEEP_BY_ALIASES = "deep:\n  l0: &l0 [[x]]\n" + "".join(f"  l{i}: &l{i} [[*l{i - 1}]]\n" for i in range(1, 20))


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
    # empty strings where a path, a name or a column is needed (`null` says "none" where a field allows it)
    "build-empty-output-path": ({"spec.yaml": BUILD.replace("path: /tmp/shards", "path: ''")}, [],
                                ["spec.yaml:5:", "field `output.path`", "must not be empty"]),
    "build-dot-output-path": ({"spec.yaml": BUILD.replace("path: /tmp/shards", "path: .")}, [],
                              ["spec.yaml:5:", "field `output.path`", "current folder"]),
    "build-dot-slash-output-path": ({"spec.yaml": BUILD.replace("path: /tmp/shards", "path: ./")}, [],
                                    ["spec.yaml:5:", "field `output.path`", "current folder"]),
    "build-root-output-path": ({"spec.yaml": BUILD.replace("path: /tmp/shards", "path: /")}, [],
                               ["spec.yaml:5:", "field `output.path`", "the root"]),
    "build-empty-input-path": ({"spec.yaml": BUILD.replace("path: urls.csv", "path: ''")}, [],
                               ["spec.yaml:3:", "field `input.path`", "must not be empty"]),
    "build-empty-url-col": ({"spec.yaml": BUILD.replace("path: urls.csv", "path: urls.csv\n  url_col: ''")}, [],
                            ["spec.yaml:4:", "field `input.url_col`", "must not be empty"]),
    "build-blank-caption-col": ({"spec.yaml": BUILD.replace("path: urls.csv", "path: urls.csv\n  caption_col: ' '")},
                                [], ["spec.yaml:4:", "field `input.caption_col`", "must not be empty"]),
    "build-empty-extra-col": ({"spec.yaml": BUILD.replace("path: urls.csv", "path: urls.csv\n  extra_cols: [a, '']")},
                              [], ["spec.yaml:4:", "field `input.extra_cols`", "item #1 must not be empty"]),
    "build-empty-user-agent": ({"spec.yaml": BUILD + "  user_agent: ''\n"}, [],
                               ["spec.yaml:11:", "field `download.user_agent`", "must not be empty"]),
    "train-empty-storage": ({"spec.yaml": TRAIN.replace("storage: /tmp/run", "storage: ''")}, [],
                            ["spec.yaml:3:", "field `storage`", "must not be empty"]),
    "train-dot-storage": ({"spec.yaml": TRAIN.replace("storage: /tmp/run", "storage: ./")}, [],
                          ["spec.yaml:3:", "field `storage`", "current folder"]),
    "train-empty-shard": ({"spec.yaml": TRAIN.replace("shards: [/tmp/shards]", "shards: ['']")}, [],
                          ["spec.yaml:7:", "field `data.shards`", "item #0 must not be empty"]),
    "train-empty-model-name": ({"spec.yaml": TRAIN.replace("name: tiny", "name: ''")}, [],
                               ["spec.yaml:5:", "field `model.name`", "must not be empty"]),
    "train-empty-checkpoint": ({"spec.yaml": TRAIN.replace("name: tiny", "name: tiny\n  checkpoint: ''")}, [],
                               ["spec.yaml:6:", "field `model.checkpoint`", "must not be empty"]),
    "train-blank-name": ({"spec.yaml": TRAIN.replace("name: t\n", "name: '   '\n")}, [],
                         ["spec.yaml:2:", "field `name`", "must not be empty"]),
    "train-empty-image-key": ({"spec.yaml": TRAIN.replace("batch_size: 8", "batch_size: 8\n  image_key: ''")}, [],
                              ["spec.yaml:9:", "field `data.image_key`", "must not be empty"]),
    "train-empty-tokenizer": ({"spec.yaml": TRAIN.replace("name: tiny", "name: tiny\n  tokenizer: ''")}, [],
                              ["spec.yaml:6:", "field `model.tokenizer`", "must not be empty"]),
    "train-empty-source-shard": ({"spec.yaml": TRAIN.replace("shards: [/tmp/shards]",
                                                             "sources: [{shards: [''], weight: 1}]")}, [],
                                 ["spec.yaml:7:", "field `data.sources.0.shards`", "item #0 must not be empty"]),
    "train-empty-ray-address": ({"spec.yaml": TRAIN + "ray: {address: ''}\n"}, [],
                                ["spec.yaml:13:", "field `ray.address`", "must not be empty"]),
    "eval-empty-storage": ({"spec.yaml": EVAL.replace("storage: /tmp/out", "storage: ''")}, [],
                           ["spec.yaml:2:", "field `storage`", "must not be empty"]),
    "eval-dot-storage": ({"spec.yaml": EVAL.replace("storage: /tmp/out", "storage: .")}, [],
                         ["spec.yaml:2:", "field `storage`", "current folder"]),
    "eval-empty-dataset": ({"spec.yaml": EVAL.replace("dataset: d", "dataset: ''")}, [],
                           ["spec.yaml:6:", "field `tasks.0.dataset`", "must not be empty"]),
    "eval-empty-checkpoint": ({"spec.yaml": EVAL.replace("{name: tiny}", "{name: tiny, checkpoint: ''}")}, [],
                              ["spec.yaml:3:", "field `model.checkpoint`", "must not be empty"]),
    "eval-empty-label": ({"spec.yaml": EVAL + "model_label: ''\n"}, [],
                         ["spec.yaml:8:", "field `model_label`", "must not be empty"]),
    "eval-dot-cache": ({"spec.yaml": EVAL + "cache: .\n"}, [], ["spec.yaml:8:", "field `cache`", "current folder"]),
    "eval-empty-image-folder": ({"spec.yaml": EVAL.replace(ZS_FROM, ZS_TO.replace("/tmp/classes", "''"))}, [],
                                ["spec.yaml:7:", "field `tasks.0.image_folder`", "must not be empty"]),
    "eval-empty-classnames": ({"spec.yaml": EVAL.replace(ZS_FROM, ZS_TO + "\n    classnames: []")}, [],
                              ["spec.yaml:8:", "field `tasks.0.classnames`", "at least 1"]),
    "sweep-dot-storage": (sweep("storage: /tmp/sweep", "storage: ."), [],
                          ["spec.yaml:3:", "field `storage`", "current folder"]),
    "sweep-empty-name": (sweep("name: s", "name: ''"), [], ["spec.yaml:2:", "field `name`"]),
    "sweep-empty-override": (sweep("grid:", "overrides: {model.name: ''}\ngrid:"), [],
                             ["spec.yaml:5:", "field `model.name`", "must not be empty"]),
    "empty-kind": ({"spec.yaml": TRAIN.replace("kind: train", "kind: ''")}, [], ["spec.yaml:1:", "field `kind`"]),
    # floats must be finite
    "lr-infinite": ({"spec.yaml": TRAIN.replace("lr: 0.001", "lr: .inf")}, [],
                    ["spec.yaml:10:", "field `optim.lr`", "finite number"]),
    "lr-too-large-read-as-text": ({"spec.yaml": TRAIN.replace("lr: 0.001", "lr: 1e309")}, [],
                                  ["spec.yaml:10:", "field `optim.lr`", "finite number"]),
    "lr-nan": ({"spec.yaml": TRAIN.replace("lr: 0.001", "lr: .nan")}, [],
               ["spec.yaml:10:", "field `optim.lr`", "finite number"]),
    "beta1-nan": ({"spec.yaml": TRAIN.replace("lr: 0.001", "lr: 0.001\n  beta1: .nan")}, [],
                  ["spec.yaml:11:", "field `optim.beta1`", "finite number"]),
    "weight-decay-minus-inf": ({"spec.yaml": TRAIN.replace("lr: 0.001", "lr: 0.001\n  weight_decay: -.inf")}, [],
                               ["spec.yaml:11:", "field `optim.weight_decay`", "finite number"]),
    "grad-clip-infinite": ({"spec.yaml": TRAIN.replace("lr: 0.001", "lr: 0.001\n  grad_clip_norm: .inf")}, [],
                           ["spec.yaml:11:", "field `optim.grad_clip_norm`", "finite number"]),
    "max-logit-scale-infinite": ({"spec.yaml": TRAIN + "loss: {max_logit_scale: .inf}\n"}, [],
                                 ["spec.yaml:13:", "field `loss.max_logit_scale`", "finite number"]),
    "cpus-per-worker-infinite": ({"spec.yaml": TRAIN + "  cpus_per_worker: .inf\n"}, [],
                                 ["spec.yaml:13:", "field `scaling.cpus_per_worker`", "finite number"]),
    "resources-infinite": ({"spec.yaml": TRAIN + "  resources: {node_a: .inf}\n"}, [],
                           ["spec.yaml:13:", "field `scaling.resources.node_a`", "finite number"]),
    "logit-bias-nan": ({"spec.yaml": TRAIN.replace("name: tiny", "name: tiny\n  init_logit_bias: .nan")}, [],
                       ["spec.yaml:6:", "field `model.init_logit_bias`", "finite number"]),
    "source-weight-infinite": ({"spec.yaml": TRAIN.replace("shards: [/tmp/shards]",
                                                           "sources: [{shards: [/a], weight: .inf}]")}, [],
                               ["spec.yaml:7:", "field `data.sources.0.weight`", "finite number"]),
    "crop-scale-nan": ({"spec.yaml": TRAIN.replace("batch_size: 8",
                                                   "batch_size: 8\n  augment: {crop_scale: [.nan, 1]}")},
                       [], ["spec.yaml:9:", "field `data.augment.crop_scale.0`", "finite number"]),
    "build-timeout-infinite": ({"spec.yaml": BUILD.replace("retries: 1", "timeout_s: .inf")}, [],
                               ["spec.yaml:10:", "field `download.timeout_s`", "finite number"]),
    "build-aspect-ratio-infinite": ({"spec.yaml": BUILD + "filters: {max_aspect_ratio: .inf}\n"}, [],
                                    ["spec.yaml:11:", "field `filters.max_aspect_ratio`", "finite number"]),
    "eval-weight-decays-nan": ({"spec.yaml": EVAL.replace(RETRIEVAL, PROBE + "\n    weight_decays: [0.1, .nan]")}, [],
                               ["spec.yaml:9:", "field `tasks.0.weight_decays.1`", "finite number"]),
    "init-scale-infinite": ({"spec.yaml": TRAIN + "precision: {mode: amp_fp16, init_scale: .inf}\n"}, [],
                            ["spec.yaml:13:", "field `precision.init_scale`", "finite number"]),
    "sweep-grid-infinite": (sweep("[0.1, 0.01]", "[0.1, .inf]"), [],
                            ["spec.yaml:6:", "lr_inf-bs8", "field `optim.lr`", "finite number"]),
    # sizes that would exhaust memory
    "resize-huge": ({"spec.yaml": BUILD.replace("size: 64", "size: 1000000000")}, [],
                    ["spec.yaml:8:", "field `resize.size`", "less than or equal to 16384"]),
    "resize-exponent-text": ({"spec.yaml": BUILD.replace("size: 64", "size: 1e9")}, [],
                             ["spec.yaml:8:", "field `resize.size`", "valid integer"]),
    "samples-per-shard-huge": ({"spec.yaml": BUILD.replace("image_format: jpg", "samples_per_shard: 1000000000")}, [],
                               ["spec.yaml:6:", "field `output.samples_per_shard`", "less than or equal"]),
    "download-threads-huge": ({"spec.yaml": BUILD.replace("retries: 1", "threads_per_worker: 10000000")}, [],
                              ["spec.yaml:10:", "field `download.threads_per_worker`", "less than or equal"]),
    "batch-huge": ({"spec.yaml": TRAIN.replace("batch_size: 8", "batch_size: 10000000000")}, [],
                   ["spec.yaml:8:", "field `data.batch_size`", "less than or equal"]),
    "loader-workers-huge": ({"spec.yaml": TRAIN.replace("batch_size: 8", "batch_size: 8\n  loader_workers: 100000")},
                            [], ["spec.yaml:9:", "field `data.loader_workers`", "less than or equal"]),
    "shuffle-buffer-huge": ({"spec.yaml": TRAIN.replace("batch_size: 8",
                                                        "batch_size: 8\n  shuffle_buffer: 1000000000")},
                            [], ["spec.yaml:9:", "field `data.shuffle_buffer`", "less than or equal"]),
    "tile-size-huge": ({"spec.yaml": TRAIN + "loss: {kind: clip_tiled, tile_size: 10000000}\n"}, [],
                       ["spec.yaml:13:", "field `loss.tile_size`", "less than or equal"]),
    "workers-huge": ({"spec.yaml": TRAIN.replace("workers: 2", "workers: 10000000")}, [],
                     ["spec.yaml:12:", "field `scaling.workers`", "less than or equal"]),
    "eval-batch-huge": ({"spec.yaml": EVAL + "batch_size: 100000000\n"}, [],
                        ["spec.yaml:8:", "field `batch_size`", "less than or equal"]),
    "clip-score-batch-huge": ({"spec.yaml": BUILD + "filters: {clip_score: {model: {name: tiny}, threshold: 0.2, "
                                                    "batch_size: 100000000}}\n"}, [],
                              ["spec.yaml:11:", "field `filters.clip_score.batch_size`", "less than or equal"]),
    "sweep-concurrency-huge": (sweep("name: s", "name: s\nmax_concurrent: 100000000"), [],
                               ["spec.yaml:3:", "field `max_concurrent`", "less than or equal"]),
    # eval templates and model names checked before any work
    "template-without-placeholder": ({"spec.yaml": EVAL.replace(ZS_FROM, ZS_TO + "\n    templates: ['a photo']")},
                                     [], ["spec.yaml:8:", "field `tasks.0.templates`", "{c}"]),
    "template-other-braces": ({"spec.yaml": EVAL.replace(ZS_FROM, ZS_TO + "\n    templates: ['{c} in {place}']")},
                              [], ["spec.yaml:8:", "field `tasks.0.templates`", "braces other than"]),
    "template-list-empty": ({"spec.yaml": EVAL.replace(ZS_FROM, ZS_TO + "\n    templates: []")}, [],
                            ["spec.yaml:8:", "field `tasks.0.templates`", "non-empty list"]),
    "template-set-unknown": ({"spec.yaml": EVAL.replace(ZS_FROM, ZS_TO + "\n    templates: imagenet_fancy")}, [],
                             ["spec.yaml:8:", "field `tasks.0.templates`", "unknown template set", "fashion_mnist"]),
    "template-file-missing": ({"spec.yaml": EVAL.replace(ZS_FROM, ZS_TO + "\n    templates: /nonexistent/t.json")},
                              [], ["spec.yaml:8:", "field `tasks.0.templates`", "not found"]),
    "template-file-not-templates": ({"spec.yaml": EVAL.replace(ZS_FROM, ZS_TO + "\n    templates: TEMPLATES"),
                                     "t.json": '["a photo"]'}, [],
                                    ["spec.yaml:8:", "field `tasks.0.templates`", "{c}"]),
    "train-eval-template-without-placeholder": (
        {"spec.yaml": TRAIN + "eval_tasks:\n- task: zeroshot_classification\n  dataset: z\n  image_folder: /x\n"
                              "  templates: [plain]\n"}, [],
        ["spec.yaml:17:", "field `eval_tasks.0.templates`", "{c}"]),
    "model-name-unknown": ({"spec.yaml": TRAIN.replace("name: tiny", "name: ViT-Q-99")}, [],
                           ["spec.yaml:5:", "field `model.name`", "unknown model 'ViT-Q-99'"]),
    "model-config-file-missing": ({"spec.yaml": TRAIN.replace("name: tiny", "name: /nonexistent/arch.json")}, [],
                                  ["spec.yaml:5:", "field `model.name`", "not found"]),
    "model-hub-name": ({"spec.yaml": TRAIN.replace("name: tiny", "name: 'hf-hub:org/model'")}, [],
                       ["spec.yaml:5:", "field `model.name`", "not supported"]),
    "eval-suite-model-unknown": ({"spec.yaml": EVAL.replace("model: {name: tiny}",
                                                            "models: [{name: nosuch, label: a}]")}, [],
                                 ["spec.yaml:3:", "field `models.0.name`", "unknown model"]),
    "clip-score-model-unknown": ({"spec.yaml": BUILD
                                  + "filters: {clip_score: {model: {name: nosuch}, threshold: 0.2}}\n"},
                                 [], ["spec.yaml:11:", "field `filters.clip_score.model.name`", "unknown model"]),
    # options of a strategy, precision mode or loss the spec does not use
    "zero-stage-under-ddp": ({"spec.yaml": TRAIN + "parallel: {zero_stage: 3}\n"}, [],
                             ["spec.yaml:", "parallel.zero_stage applies to strategy deepspeed only", "is ddp"]),
    "fsdp-offload-under-ddp": ({"spec.yaml": TRAIN + "parallel: {fsdp_cpu_offload: true}\n"}, [],
                               ["parallel.fsdp_cpu_offload applies to strategy fsdp2 only"]),
    "deepspeed-config-under-fsdp2": ({"spec.yaml": TRAIN + "strategy: fsdp2\nparallel: {deepspeed_config: {a: 1}}\n"},
                                     [], ["parallel.deepspeed_config applies to strategy deepspeed only", "fsdp2"]),
    "reduce-dtype-under-ddp": ({"spec.yaml": TRAIN + "precision: {mode: amp_bf16, reduce_dtype: bf16}\n"}, [],
                               ["precision.reduce_dtype applies to strategy fsdp2 only"]),
    "init-scale-under-fp32": ({"spec.yaml": TRAIN + "precision: {init_scale: 1024}\n"}, [],
                              ["precision.init_scale applies to precision.mode amp_fp16 only", "is fp32"]),
    "tile-size-under-clip": ({"spec.yaml": TRAIN + "loss: {kind: clip, tile_size: 64}\n"}, [],
                             ["loss.tile_size applies to loss.kind clip_tiled only"]),
    # the YAML itself: bounded in size, depth and alias expansion; keys are names
    "alias-bomb": ({"spec.yaml": TRAIN + ALIAS_BOMB}, [], ["spec.yaml:", "refused", "aliases expand to more than"]),
    "nested-1000-flow": ({"spec.yaml": TRAIN + "seed: " + "[" * 1000 + "]" * 1000 + "\n"}, [],
                         ["spec.yaml:13:", "refused", "nested more than"]),
    "nested-500-block": ({"spec.yaml": TRAIN + "x:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 500))}, [],
                         ["spec.yaml:", "refused", "nested more than"]),
    "alias-nesting-too-deep": ({"spec.yaml": TRAIN + DEEP_BY_ALIASES}, [],
                               ["spec.yaml:", "refused", "nested more than", "aliases expanded"]),
    "recursive-alias": ({"spec.yaml": TRAIN + "seed: &a [*a]\n"}, [], ["spec.yaml:13:", "refused", "recursive"]),
    "list-as-key": ({"spec.yaml": TRAIN + "? [a, b]\n: 1\n"}, [], ["spec.yaml:13:", "refused", "a list used as a"]),
    "mapping-as-key": ({"spec.yaml": TRAIN + "? {a: 1}\n: 1\n"}, [], ["spec.yaml:13:", "a mapping used as a"]),
    "null-key": ({"spec.yaml": TRAIN + "~: 1\n"}, [], ["spec.yaml:13:", "key `~` reads as null"]),
    "boolean-key": ({"spec.yaml": TRAIN + "on: 1\n"}, [], ["spec.yaml:13:", "key `on` reads as bool", "quote it"]),
    "integer-key": ({"spec.yaml": TRAIN.replace("  lr: 0.001", "  1: 0.001")}, [], ["spec.yaml:10:", "reads as int"]),
    "spec-file-too-large": ({"spec.yaml": TRAIN + "# " + "x" * (1 << 20) + "\n"}, [],
                            ["spec.yaml", "a spec file may have at most"]),
    "two-documents": ({"spec.yaml": TRAIN + "---\nkind: eval\n"}, [], ["spec.yaml:13:", "invalid YAML"]),
    "undefined-alias": ({"spec.yaml": TRAIN + "seed: *nothing\n"}, [], ["spec.yaml:13:", "undefined alias"]),
    "sweep-base-alias-bomb": ({"spec.yaml": SWEEP, "base.yaml": TRAIN + ALIAS_BOMB}, [],
                              ["spec.yaml:4:", "field `base`", "base.yaml", "aliases expand"]),
    # command-line overrides: errors name the override, not the file's line
    "override-bad-number": ({"spec.yaml": TRAIN}, ["optim.lr=abc"],
                            ["override `optim.lr=abc`", "field `optim.lr`", "valid number"]),
    "override-infinite": ({"spec.yaml": TRAIN}, ["optim.lr=.inf"], ["override `optim.lr=.inf`", "finite number"]),
    "override-empty-storage": ({"spec.yaml": TRAIN}, ["storage="], ["override `storage=`", "field `storage`",
                                                                   "must not be empty"]),
    "override-new-unknown-field": ({"spec.yaml": TRAIN}, ["optim.lrr=1"], ["override `optim.lrr=1`", "unknown field"]),
    "override-section-replaced": ({"spec.yaml": TRAIN}, ["optim={lr: x}"], ["override `optim={lr: x}`",
                                                                           "field `optim.lr`"]),
    "override-bad-yaml": ({"spec.yaml": TRAIN}, ["name=[oops"], ["override `name=[oops`", "invalid YAML"]),
    "override-python-tag": ({"spec.yaml": TRAIN}, ["seed=!!python/name:os.system"],
                            ["override `seed=!!python/name:os.system`", "YAML tag not allowed"]),
    "override-list-index-out-of-range": ({"spec.yaml": TRAIN}, ["data.shards.5=/x"],
                                         ["override `data.shards.5=/x`", "list of 1"]),
}
IN_FRESH_PROCESS = {"float-is-a-word", "python-apply-tag", "duplicate-top-level-key", "unknown-kind",
                    "spec-file-missing", "sweep-unknown-field-in-grid", "sweep-bad-child-value", "alias-bomb",
                    "nested-1000-flow", "build-empty-output-path", "override-bad-number", "model-name-unknown"}
# Refusals must be quick whatever the input: one small file must not stall a scheduler that validates user specs.
MAX_SECONDS_IN_PROCESS = 2.0


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
    assert len(CASES) >= 100 and len(IN_FRESH_PROCESS) >= 10 and IN_FRESH_PROCESS <= set(CASES)
    kinds = {kind for files, _, _ in CASES.values() for kind in ("build", "train", "eval", "sweep")
             if f"kind: {kind}" in str(files.get("spec.yaml", ""))}
    assert kinds == {"build", "train", "eval", "sweep"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_spec_gives_one_clear_error(tmp_path, case):
    files, extra, needles = CASES[case]
    files = {name: text.replace("TEMPLATES", str(tmp_path / "t.json")) if isinstance(text, str) else text
             for name, text in files.items()}
    spec = write_files(tmp_path, files)
    t0 = time.perf_counter()
    if case in IN_FRESH_PROCESS:
        r = subprocess.run([sys.executable, "-m", "clipforge", "validate", str(spec), *extra],
                           capture_output=True, text=True, timeout=120)
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        r = CliRunner().invoke(app, ["validate", str(spec), *extra])
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        code, out, err = r.exit_code, r.stdout, r.stderr
        assert time.perf_counter() - t0 < MAX_SECONDS_IN_PROCESS, f"{case} took {time.perf_counter() - t0:.2f} s"
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
