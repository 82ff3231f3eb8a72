"""The retrieval task under CLIP_benchmark's name, its old name as an alias, and eval folders of both eras."""
from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from clipforge.eval.evaluator import output_owner, result_filename
from clipforge.eval.spec import EvalSpec
from clipforge.runtime.output_folder import claim_output_folder
from clipforge.runtime.run_dir import (
    EVAL_STATS_FILE,
    LEGACY_EVAL_STATS_FILE,
    LEGACY_RESULTS_FILE,
    RESULTS_FILE,
    json_lines,
    read_eval_results,
    read_eval_stats,
)

RESULT = {"dataset": "wds/val", "model": "tiny", "pretrained": "seed1", "task": "zeroshot_retrieval",
          "metrics": {"image_retrieval_recall@1": 0.5, "acc5": float("nan")}, "language": "en"}


def _spec(task: str, tmp_path) -> EvalSpec:
    return EvalSpec.model_validate({"kind": "eval", "storage": str(tmp_path / "out"), "model": {"name": "tiny"},
                                    "tasks": [{"task": task, "dataset": "wds/val", "shards": ["x.tar"]}]})


@pytest.mark.parametrize("name", ["zeroshot_retrieval", "retrieval"])
def test_both_names_read_as_zeroshot_retrieval(name, tmp_path):
    spec = _spec(name, tmp_path)
    assert spec.tasks[0].task == "zeroshot_retrieval"
    # The dumped spec (spec.yaml, what workers receive) carries the one name, and reads back the same.
    dumped = yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))
    assert dumped["tasks"][0]["task"] == "zeroshot_retrieval"
    assert EvalSpec.model_validate(dumped) == spec
    filename = result_filename("wds/val", "seed1", "tiny", spec.tasks[0].task)
    assert filename == "wds_val_seed1_tiny_en_zeroshot_retrieval.json"


def test_an_unknown_task_names_both(tmp_path):
    with pytest.raises(ValidationError) as err:
        _spec("captioning", tmp_path)
    assert "'zeroshot_retrieval'" in str(err.value) and "'retrieval'" in str(err.value)


def test_results_and_stats_read_from_new_and_old_folders(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    (new / RESULTS_FILE).write_text(json_lines([RESULT, {**RESULT, "dataset": "other"}]))
    (new / EVAL_STATS_FILE).write_text(json_lines([{"cache": None, "model": "tiny", "images_embedded": 3}]))
    legacy_result = {**RESULT, "task": "retrieval"}
    (old / LEGACY_RESULTS_FILE).write_text(json.dumps([legacy_result], indent=2))
    (old / LEGACY_EVAL_STATS_FILE).write_text(json.dumps({"cache": "c", "models": [{"model": "tiny"}]}))

    got = read_eval_results(str(new))
    assert [r["dataset"] for r in got] == ["wds/val", "other"]
    assert got[0]["metrics"]["acc5"] != got[0]["metrics"]["acc5"]  # NaN, as CLIP_benchmark writes it
    assert read_eval_stats(str(new)) == [{"cache": None, "model": "tiny", "images_embedded": 3}]
    assert read_eval_results(str(old))[0]["task"] == "retrieval"
    assert read_eval_stats(str(old)) == [{"cache": "c", "model": "tiny"}]
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        read_eval_results(str(tmp_path))


def test_the_job_adopts_its_folder_of_either_era(tmp_path):
    """A folder an eval job wrote before the job marked its folders is recognised by results.json or results.jsonl."""
    spec = _spec("retrieval", tmp_path)
    for i, summary in enumerate((LEGACY_RESULTS_FILE, RESULTS_FILE)):
        folder = tmp_path / f"f{i}"
        folder.mkdir()
        (folder / summary).write_text("[]")
        (folder / "wds_val_clipforge_tiny_en_retrieval.json").write_text(json.dumps(RESULT))
        assert claim_output_folder(str(folder), output_owner(spec)) is True
