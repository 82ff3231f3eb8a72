"""Checkpoints: every N steps, what they hold, keep-last, damaged ones, exact mid-epoch resume, and S3.

The S3 test is a real Ray Train fit (2 workers) reading shards from and writing the run to a real S3
API (moto_server); the others run the same loop as one rank in this process.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clipforge.models.checkpoint_files import load_extra, load_model_state, load_optimizer_state
from clipforge.train import run_checkpoints
from clipforge.train.loop import train_worker
from clipforge.train.optimizer import lr_at
from clipforge.train.trainer import run_train

from s3_server import KEY_ID, REGION, SECRET, new_bucket, s3fs_for
from train_fixtures import read_lines, step_lines, train_spec, truncate, write_shards


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_step_checkpoints_contents_keep_last_and_damaged_ones(tmp_path, caplog):
    torch.set_num_threads(1)
    write_shards(tmp_path / "data", [16, 16])
    # 32 samples / batch 8: 4 steps per epoch. Checkpoints at steps 3, 4 (epoch end), 6, 8 (epoch end), 9, 10 (end).
    spec = train_spec(str(tmp_path / "run"), [str(tmp_path / "data")], scaling={"workers": 1}, resume="auto",
                      optim={"steps": 10}, checkpoint={"every_steps": 3, "keep_last": 2})
    run = Path(spec.storage)
    summary = train_worker(spec)
    assert summary["steps"] == 10 and summary["epochs"] == 2
    assert _names(run) == ["step_00000009", "step_00000010"]
    meta = json.loads((run / "checkpoints" / "step_00000010" / "meta.json").read_text())
    assert (meta["step"], meta["epoch"], meta["step_in_epoch"], meta["samples_seen"]) == (10, 2, 2, 80)
    # Two batches of epoch 3 consumed 16 items of the single loader stream.
    assert meta["data_position"] == {"layout": "streamed/1", "world_size": 1,
                                     "ranks": [{"consumed": [16], "next_loader": 0}]}
    assert meta["metrics"]["step"] == 10 and meta["metrics"]["loss"] == pytest.approx(meta["loss"])
    assert meta["spec"]["optim"]["steps"] == 10 and meta["restarts"] == 0 and meta["skipped_samples"] == 0
    assert load_extra(str(run / "checkpoints" / "step_00000010"))["scheduler"]["step"] == 10
    opt = load_optimizer_state(str(run / "checkpoints" / "step_00000010"))
    assert {int(s["step"]) for s in opt["state"].values()} == {10}

    # The newest checkpoint's weights were cut mid-write; a directory without meta.json is not a checkpoint.
    truncate(run / "checkpoints" / "step_00000010" / "model.pt", 0.6)
    assert "model.pt: not a complete torch file" in run_checkpoints.verify(str(run / "checkpoints" / "step_00000010"))
    assert run_checkpoints.verify(str(run / "checkpoints" / "step_00000009")) is None
    (run / "checkpoints" / "step_00000099").mkdir()
    (run / "checkpoints" / "step_00000099" / "model.pt").write_bytes(b"partial")
    longer = spec.model_copy(update={"optim": spec.optim.model_copy(update={"steps": 12})})
    resumed = train_worker(longer)
    assert resumed["resumed_from"] == str(run / "checkpoints" / "step_00000009")
    assert "step_00000010 is damaged (model.pt" in caplog.text
    assert resumed["steps"] == 12 and resumed["restarts"] == 1
    lines = step_lines(read_lines((run / "metrics.jsonl").read_text()))
    assert [m["step"] for m in lines] == list(range(1, 13))  # steps 10.. of the first run were dropped
    assert [m["restarts"] for m in lines] == [0] * 9 + [1] * 3
    # The schedule continued at step 10 of a 12-step run.
    assert lines[9]["lr"] == pytest.approx(lr_at(9, spec.optim.lr, 2, 12))
    # Pruning removed the damaged checkpoint (older than a whole one) and left the stray directory alone.
    assert _names(run) == ["epoch_0003", "step_00000009", "step_00000099"]


def test_a_run_resumed_mid_epoch_continues_exactly_like_an_uninterrupted_one(tmp_path):
    """Two loader processes, a shuffle buffer and an odd batch: the checkpoint after step 3 sits mid-epoch, with
    loader 1's item next. Resumed from it, steps 4-10 (into the next epoch) have the same losses and end with
    the same weights as the run that was never stopped."""
    torch.set_num_threads(1)
    write_shards(tmp_path / "data", [10, 10, 10])
    common = dict(scaling={"workers": 1}, model={"name": "tiny", "trainable": "heads"}, cache_frozen_features=False,
                  data={"batch_size": 5, "loader_workers": 2, "shuffle_buffer": 4},
                  optim={"steps": 10, "lr": 5e-3}, checkpoint={"every_steps": 3, "keep_last": 5})
    whole = train_spec(str(tmp_path / "whole"), [str(tmp_path / "data")], **common)
    train_worker(whole)
    first = tmp_path / "whole" / "checkpoints" / "step_00000003"
    meta = json.loads((first / "meta.json").read_text())
    assert meta["data_position"]["ranks"] == [{"consumed": [8, 7], "next_loader": 1}]

    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(first, tmp_path / "part" / "checkpoints" / first.name)
    part = train_spec(str(tmp_path / "part"), [str(tmp_path / "data")], **common)
    summary = train_worker(part)
    assert summary["resumed_from"] == str(tmp_path / "part" / "checkpoints" / "step_00000003")
    expected = step_lines(read_lines((tmp_path / "whole" / "metrics.jsonl").read_text()))[3:]
    got = step_lines(read_lines((tmp_path / "part" / "metrics.jsonl").read_text()))
    assert [m["step"] for m in got] == list(range(4, 11))
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in expected], abs=1e-6)
    final_whole = load_model_state(str(tmp_path / "whole"))
    final_part = load_model_state(str(tmp_path / "part"))
    assert all(torch.allclose(final_whole[k], final_part[k], atol=1e-6) for k in final_whole)


@pytest.mark.timeout(600)
def test_train_on_s3_shards_to_s3_storage_then_resume_from_s3(ray_local, moto_endpoint, tmp_path, monkeypatch):
    s3_endpoint = moto_endpoint
    # Settings appear in the environment only after Ray started: the runner must hand them to its workers.
    for name, value in (("AWS_ENDPOINT_URL", s3_endpoint), ("AWS_ACCESS_KEY_ID", KEY_ID),
                        ("AWS_SECRET_ACCESS_KEY", SECRET), ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    torch.set_num_threads(1)
    fs = s3fs_for(s3_endpoint)
    bucket = new_bucket(s3_endpoint)
    for path in write_shards(tmp_path / "data", [16, 16]):
        fs.put_file(str(path), f"{bucket}/shards/{path.name}")
    storage = f"s3://{bucket}/runs/s3run"
    # 16 samples per rank, local batches of 4: 4 steps per epoch; checkpoints at steps 2, 4 (epoch end) and 6.
    spec = train_spec(storage, [f"s3://{bucket}/shards"], optim={"steps": 6}, tensorboard=True,
                      checkpoint={"every_steps": 2, "keep_last": 2})
    summary = run_train(spec, progress=False)
    assert summary["steps"] == 6 and summary["epochs"] == 1
    assert summary["checkpoint"] == f"{storage}/checkpoints/step_00000006"
    run = f"{bucket}/runs/s3run"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{run}/checkpoints", refresh=True)) == [
        "epoch_0001", "step_00000006"]
    assert json.loads(fs.cat_file(f"{run}/summary.json"))["steps"] == 6
    assert [m["step"] for m in step_lines(read_lines(fs.cat_file(f"{run}/metrics.jsonl").decode()))] == list(
        range(1, 7))
    assert any(p.rsplit("/", 1)[1].startswith("events.out.tfevents") for p in fs.ls(f"{run}/tensorboard"))
    ranks = {json.loads(fs.cat_file(p))["rank"] for p in fs.ls(f"{run}/workers")}
    assert ranks == {0, 1}

    # Resumed from S3 in this process, as one rank with the same global batch (the saved data position is for
    # two ranks, so the part-way epoch 2 starts over from its first sample, and ends at step 8).
    longer = train_spec(storage, [f"s3://{bucket}/shards"], optim={"steps": 8}, scaling={"workers": 1},
                        checkpoint={"every_steps": 2, "keep_last": 2})
    resumed = train_worker(longer)
    assert resumed["resumed_from"] == f"{storage}/checkpoints/step_00000006" and resumed["steps"] == 8
    lines = step_lines(read_lines(fs.cat_file(f"{run}/metrics.jsonl").decode()))
    assert [m["step"] for m in lines] == list(range(1, 9)) and [m["restarts"] for m in lines[6:]] == [1, 1]
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{run}/checkpoints")) == ["epoch_0002", "step_00000006"]
