"""Spec loading: every malformed spec fails with one clear message naming the field (and line), never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clipforge.cluster.specs import SpecError, load_spec

from spec_fixtures import TRAIN_YAML

REPO = Path(__file__).resolve().parents[2]

TRAIN_OK = TRAIN_YAML


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_valid_train_spec_fills_defaults(tmp_path):
    spec = load_spec(write(tmp_path, TRAIN_OK))
    assert spec.kind == "train"
    assert spec.optim.lr == 0.001
    assert spec.loss.gather_with_grad is True
    assert spec.model.trainable == "all"


def test_overrides_apply_and_are_typed(tmp_path):
    spec = load_spec(write(tmp_path, TRAIN_OK), ["optim.lr=1e-4", "scaling.workers=4", "data.batch_size=16"])
    assert spec.optim.lr == pytest.approx(1e-4)
    assert spec.scaling.workers == 4


@pytest.mark.parametrize(
    "text, expected",
    [
        (TRAIN_OK.replace("kind: train", "kind: trian"), "unknown kind 'trian'"),
        (TRAIN_OK.replace("kind: train\n", ""), "missing `kind`"),
        (TRAIN_OK.replace("  lr: 0.001", "  lr: fast"), "field `optim.lr`"),
        (TRAIN_OK.replace("  lr: 0.001", "  lr: -1"), "field `optim.lr`"),
        (TRAIN_OK.replace("  lr: 0.001", "  lrr: 0.001"), "field `optim.lrr`: unknown field"),
        (TRAIN_OK.replace("storage: /tmp/run\n", ""), "field `storage`: required field is missing"),
        (TRAIN_OK.replace("  name: tiny", "  name: tiny\n  trainable: some"), "field `model.trainable`"),
        (TRAIN_OK.replace("  workers: 2", "  workers: 0"), "field `scaling.workers`"),
        (TRAIN_OK.replace("  batch_size: 8", "  batch_size: 7"), "divisible by scaling.workers"),
        (TRAIN_OK + "name: again\n", "duplicate key `name`"),
        (TRAIN_OK.replace("name: t\n", "name: !!python/object/apply:os.system ['true']\n", 1), "YAML tag not allowed"),
        (TRAIN_OK.replace("  batch_size: 8", "  batch_size: [8"), "invalid YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
    ],
)
def test_malformed_specs_name_the_problem(tmp_path, text, expected):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text))
    assert expected in str(e.value)
    assert str(tmp_path / "spec.yaml") in str(e.value)


def test_error_names_the_line(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, TRAIN_OK.replace("  lr: 0.001", "  lr: fast")))
    assert "spec.yaml:10:" in str(e.value)  # `lr:` is on line 10


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_cli_validate_reports_without_traceback(tmp_path):
    bad = write(tmp_path, TRAIN_OK.replace("kind: train", "kind: nonsense"))
    r = subprocess.run([sys.executable, "-m", "clipforge", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown kind 'nonsense'" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    good = write(tmp_path, TRAIN_OK)
    r = subprocess.run([sys.executable, "-m", "clipforge", "validate", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "valid `train` spec" in r.stdout


def test_cli_schema_lists_documented_fields():
    r = subprocess.run([sys.executable, "-m", "clipforge", "schema", "build"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "allow_private_networks" in r.stdout and "description" in r.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_example_specs_validate(path):
    load_spec(path)


EVAL_OK = """\
kind: eval
storage: /tmp/out
model: {name: tiny}
tasks:
  - task: retrieval
    dataset: d
    shards: [/tmp/shards]
    recall_k: [1, 0]
"""


def test_error_path_inside_a_task_list_has_no_union_tag(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, EVAL_OK))
    assert "field `tasks.0.recall_k`" in str(e.value)
    assert "spec.yaml:8:" in str(e.value)
