"""Checkpoint integrity: file digests recorded in meta.json and checked on every load, finite model weights,
and resumes that pass over a checkpoint damaged in place (zip directory intact, tensor bytes overwritten).

All on real files (local and a real S3 API) with real torch; the last test resumes a real training run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from clipforge.errors import UserError
from clipforge.models.checkpoint_files import (
    EXTRA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    load_extra,
    load_meta,
    load_model_state,
    load_optimizer_state,
    save_checkpoint,
)
from clipforge.train import run_checkpoints
from clipforge.train.loop import train_worker

from s3_server import new_bucket, s3fs_for, use_s3_from_environment
from train_fixtures import read_lines, step_lines, train_spec, write_shards

LOADERS = {MODEL_FILE: load_model_state, OPTIMIZER_FILE: load_optimizer_state, EXTRA_FILE: load_extra}


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(64, 64, generator=g), "proj.bias": torch.zeros(64)}


def _save(directory: str, seed: int, model_state: dict | None = None) -> str:
    """A checkpoint with all three files, each holding a tensor big enough to damage in its middle."""
    g = torch.Generator().manual_seed(seed + 1000)
    optimizer = {"state": {0: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(64, 64, generator=g)}},
                 "param_groups": [{"lr": 1e-3, "params": [0]}]}
    extra = {"scheduler": {"step": seed}, "noise": torch.randn(4096, generator=g)}
    return save_checkpoint(directory, model_state if model_state is not None else _model_state(seed),
                           {"step": seed, "model_name": "toy"}, optimizer_state=optimizer, extra=extra)


def _overwrite_tensor_bytes(data: bytes, count: int = 4096) -> bytes:
    """`data` (a torch.save file) with `count` random bytes written over the middle of its largest tensor's data.
    The zip directory and every member's place stay the same: only the bytes' digest can tell."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        biggest = max(zf.infolist(), key=lambda info: info.file_size)
    assert "/data/" in biggest.filename and biggest.file_size >= 2 * count, biggest
    name_len, extra_len = struct.unpack("<HH", data[biggest.header_offset + 26:biggest.header_offset + 30])
    start = biggest.header_offset + 30 + name_len + extra_len
    at = start + (biggest.file_size - count) // 2
    return data[:at] + os.urandom(count) + data[at + count:]


def _damage_in_place(path: Path) -> bytes:
    """Overwrite tensor bytes of a local torch file in place; returns the file's new content."""
    before = path.read_bytes()
    after = _overwrite_tensor_bytes(before)
    path.write_bytes(after)
    with zipfile.ZipFile(io.BytesIO(before)) as old, zipfile.ZipFile(io.BytesIO(after)) as new:
        assert [(i.filename, i.header_offset) for i in old.infolist()] == [
            (i.filename, i.header_offset) for i in new.infolist()]
    return after


def _files(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())["files"]


def test_every_file_written_has_its_sha256_and_size_in_meta_json(tmp_path):
    ckpt = Path(_save(str(tmp_path / "ckpt"), 1))
    files = _files(ckpt)
    assert set(files) == {MODEL_FILE, OPTIMIZER_FILE, EXTRA_FILE}
    for name, record in files.items():
        data = (ckpt / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    # The record is the format's own: load_meta gives back the meta the checkpoint was saved with.
    assert load_meta(str(ckpt)) == {"step": 1, "model_name": "toy"}
    # A model-only checkpoint records the one file it has.
    only_model = Path(save_checkpoint(str(tmp_path / "model-only"), _model_state(2), {}))
    assert set(_files(only_model)) == {MODEL_FILE}


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE, EXTRA_FILE])
def test_a_file_overwritten_in_place_is_refused_and_resume_takes_the_checkpoint_before(tmp_path, caplog, name):
    run = tmp_path / "run" / "checkpoints"
    older = _save(str(run / "step_00000001"), 1)
    newest = Path(_save(str(run / "step_00000002"), 2))
    expected = _files(newest)[name]["sha256"]
    found = hashlib.sha256(_damage_in_place(newest / name)).hexdigest()

    with pytest.raises(CheckpointError) as refused:
        LOADERS[name](str(newest))
    message = str(refused.value)
    assert f"{newest / name} does not match its checksum" in message
    assert expected in message and found in message and "\n" not in message
    assert isinstance(refused.value, UserError)
    assert name in run_checkpoints.verify(str(newest))

    assert run_checkpoints.latest_valid(str(run)) == older
    assert f"checkpoint {newest} is damaged" in caplog.text and expected in caplog.text
    # Pruning keeps its rules: the damaged newest one stays (nothing newer is whole), so does the whole one.
    assert run_checkpoints.prune(str(run), keep_last=1) == []


def test_a_checkpoint_written_before_checksums_still_loads_and_resumes(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    _save(str(run / "step_00000001"), 1)
    old = Path(_save(str(run / "step_00000002"), 2))
    meta = json.loads((old / "meta.json").read_text())
    del meta["files"]
    (old / "meta.json").write_text(json.dumps(meta))

    assert torch.equal(load_model_state(str(old))["proj.weight"], _model_state(2)["proj.weight"])
    assert load_extra(str(old))["scheduler"] == {"step": 2}
    assert load_optimizer_state(str(old))["param_groups"][0]["lr"] == 1e-3
    assert run_checkpoints.verify(str(old)) is None
    assert run_checkpoints.latest_valid(str(run)) == str(old)


def test_non_finite_weights_are_refused_with_the_tensor_named_and_skipped_on_resume(tmp_path, caplog):
    run = tmp_path / "run" / "checkpoints"
    older = _save(str(run / "step_00000001"), 1)
    diverged = _model_state(2)
    diverged["proj.bias"][7] = float("nan")
    newest = Path(_save(str(run / "step_00000002"), 2, model_state=diverged))
    # The digests match: the file is as written, but what was written is unusable.
    with pytest.raises(CheckpointError, match=r"model\.pt are not finite: tensor proj\.bias holds NaN"):
        load_model_state(str(newest))
    assert run_checkpoints.latest_valid(str(run)) == older
    assert f"checkpoint {newest} is damaged" in caplog.text and "proj.bias" in caplog.text

    # Without digests (a checkpoint written before them) the weights are checked all the same.
    meta = json.loads((newest / "meta.json").read_text())
    del meta["files"]
    (newest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="proj.bias"):
        load_model_state(str(newest))
    assert run_checkpoints.latest_valid(str(run)) == older

    # A standalone state-dict file has no meta.json: the finiteness check alone.
    standalone = tmp_path / "weights.pt"
    torch.save({**_model_state(3), "logit_scale": torch.tensor(float("inf"))}, standalone)
    with pytest.raises(CheckpointError, match=f"{standalone}.*tensor logit_scale"):
        load_model_state(str(standalone))
    torch.save(_model_state(3), standalone)
    assert torch.equal(load_model_state(str(standalone))["proj.weight"], _model_state(3)["proj.weight"])


def test_on_s3_digests_are_recorded_and_a_damaged_newest_checkpoint_is_passed_over(moto_endpoint, monkeypatch,
                                                                                   caplog):
    import s3fs

    use_s3_from_environment(monkeypatch, moto_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # a client made before these settings would reach another server
    fs = s3fs_for(moto_endpoint)
    run = f"s3://{new_bucket(moto_endpoint)}/run/checkpoints"
    older = _save(f"{run}/step_00000001", 1)
    newest = _save(f"{run}/step_00000002", 2)
    files = json.loads(fs.cat_file(f"{newest}/meta.json"))["files"]
    for name, record in files.items():
        assert record["sha256"] == hashlib.sha256(fs.cat_file(f"{newest}/{name}")).hexdigest()
    assert run_checkpoints.latest_valid(run) == newest

    fs.pipe_file(f"{newest}/{MODEL_FILE}", _overwrite_tensor_bytes(fs.cat_file(f"{newest}/{MODEL_FILE}")))
    with pytest.raises(CheckpointError, match=f"{newest}/model.pt does not match its checksum"):
        load_model_state(newest)
    assert run_checkpoints.latest_valid(run) == older
    assert f"checkpoint {newest} is damaged" in caplog.text
    assert run_checkpoints.prune(run, keep_last=1) == []
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_run_resumed_after_its_newest_checkpoint_was_damaged_starts_from_the_one_before(tmp_path, caplog):
    torch.set_num_threads(1)
    write_shards(tmp_path / "data", [16, 16])
    # 32 samples / batch 8: 4 steps per epoch; checkpoints at step 2 (step_00000002) and 4 (epoch_0001).
    common = dict(scaling={"workers": 1}, checkpoint={"every_steps": 2, "keep_last": 3})
    spec = train_spec(str(tmp_path / "run"), [str(tmp_path / "data")], optim={"steps": 4}, **common)
    train_worker(spec)
    ckpts = tmp_path / "run" / "checkpoints"
    _damage_in_place(ckpts / "epoch_0001" / MODEL_FILE)

    longer = train_spec(str(tmp_path / "run"), [str(tmp_path / "data")], optim={"steps": 6}, **common)
    resumed = train_worker(longer)
    assert resumed["resumed_from"] == str(ckpts / "step_00000002")
    assert f"checkpoint {ckpts / 'epoch_0001'} is damaged" in caplog.text
    assert resumed["steps"] == 6 and resumed["restarts"] == 1
    lines = step_lines(read_lines((tmp_path / "run" / "metrics.jsonl").read_text()))
    assert [m["step"] for m in lines] == list(range(1, 7)) and [m["restarts"] for m in lines] == [0, 0] + [1] * 4
    # epoch_0001 was written again by the resumed run; every checkpoint left is whole, with finite weights.
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_0001", "step_00000002", "step_00000006"]
    for checkpoint in ckpts.iterdir():
        assert run_checkpoints.verify(str(checkpoint)) is None
    final = load_model_state(str(tmp_path / "run"))
    assert all(bool(torch.isfinite(t).all()) for t in final.values() if t.is_floating_point())
