"""The output folder's marker: `.clipforge-output`, and folders marked `.clipforge-job.json` by earlier versions."""
from __future__ import annotations

import json

import pytest

from clipforge.errors import OutputFolderError
from clipforge.runtime.output_folder import LEGACY_MARKER, MARKER, OutputOwner, claim_output_folder, folder_owner

OWNER = OutputOwner("eval", "suite", "storage", own_names=("results.*",), signature=("results.jsonl",))


def test_a_new_folder_gets_the_marker_and_no_json_file(tmp_path):
    out = tmp_path / "out"
    assert claim_output_folder(str(out), OWNER) is False
    assert [p.name for p in out.iterdir()] == [MARKER]
    assert not MARKER.endswith(".json")  # clip_benchmark build reads every *.json of a results folder
    assert folder_owner(str(out)) == ("eval", "suite")


def test_a_legacy_marker_of_the_same_job_is_renamed_on_its_next_run(tmp_path):
    (tmp_path / LEGACY_MARKER).write_text(json.dumps({"kind": "eval", "name": "suite"}))
    (tmp_path / "notes.txt").write_text("kept")
    assert folder_owner(str(tmp_path)) == ("eval", "suite")
    assert claim_output_folder(str(tmp_path), OWNER) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MARKER, "notes.txt"])
    assert json.loads((tmp_path / MARKER).read_text())["name"] == "suite"


def test_a_legacy_marker_of_another_job_is_refused_and_left_alone(tmp_path):
    (tmp_path / LEGACY_MARKER).write_text(json.dumps({"kind": "train", "name": "other"}))
    with pytest.raises(OutputFolderError, match="`train` job `other`"):
        claim_output_folder(str(tmp_path), OWNER)
    assert [p.name for p in tmp_path.iterdir()] == [LEGACY_MARKER]
