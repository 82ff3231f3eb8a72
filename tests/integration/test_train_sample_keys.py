"""`debug.log_sample_keys`: the keys of the samples every rank trained on, per step, in STORAGE/sample_keys.jsonl.

Without Ray: keys travel with their samples through loader processes and batches; the log keeps every attempt's
lines and the reader lets a resumed attempt supersede the steps after its checkpoint, on local files and on S3.
With Ray: an uninterrupted 2-worker run trains on every sample once per epoch, and a run whose rank 1 is killed
mid-run and resumed from a part-way-epoch checkpoint trains on exactly the same keys in every step (what the
killed attempt trained on after the checkpoint is replayed too).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipforge.runtime.run_dir import read_sample_key_lines, read_sample_keys
from clipforge.train.data import BatchKeys, RankSamples, SkipCounter, StreamPosition, batches, plan_split, sample_loader
from clipforge.train.sample_keys import SampleKeyLog
from clipforge.train.shards import SampleKeys, count_samples
from clipforge.train.trainer import run_train

from s3_server import new_bucket, s3fs_for, use_s3_from_environment
from train_fixtures import killing_rank_after_step, train_spec, write_shards

KEYS = SampleKeys.parse("png", "txt")
SIZES = [16, 16]  # one shard per rank: 16 samples, local batches of 4, 4 steps per epoch
STEPS_PER_EPOCH, BUDGET, EVERY, KILL_AFTER = 4, 20, 3, 8


def _number_tokens(texts: list[str]) -> torch.Tensor:
    """A "tokenizer" that keeps the sample number of the fixture captions ("a red square number 5")."""
    return torch.tensor([[int(t.rsplit(" ", 1)[1])] for t in texts])


# ---------------------------------------------------------------- no Ray


@pytest.mark.parametrize("loaders", [0, 2])
def test_each_batch_carries_the_keys_of_its_own_samples(tmp_path, loaders):
    shards = [str(p) for p in write_shards(tmp_path, [7, 9, 6], corrupt=frozenset({3, 11}))]
    (plan,) = plan_split(shards, [count_samples(s, KEYS) for s in shards], 1)
    ds = RankSamples(plan, KEYS, lambda image: torch.zeros(1), _number_tokens, seed=1, epoch=0, shuffle_buffer=4,
                     tag=True, with_keys=True)
    position, current, skipped = StreamPosition(), BatchKeys(), SkipCounter()
    position.start(max(1, loaders))
    seen: list[str] = []
    for _, tokens in batches(sample_loader(ds, loaders, 5), 5, skipped, position=position, keys=current):
        assert current.last == [f"{n:06d}" for n in tokens[:, 0].tolist()]
        seen += current.last
    # 22 samples, 2 undecodable: 4 batches of 5 in shuffled order, none twice, the undecodable ones never.
    assert skipped.count == 2 and len(seen) == 20 == len(set(seen))
    assert not {"000003", "000011"} & set(seen) and seen != sorted(seen)


def _attempt(storage: str, start: int, restarts: int, steps: range, tag: str, resumed: bool) -> SampleKeyLog:
    log = SampleKeyLog(storage, start, restarts, resumed=resumed)
    for step in steps:
        log.record(step, 1, [[f"{tag}{step}a", f"{tag}{step}b"], [f"{tag}{step}c"]])
    log.flush()
    return log


def _check_superseded(storage: str) -> None:
    # Attempt 0 trained steps 1..6 and was cut off; attempt 1 resumed from step 4 and trained 5..8.
    assert read_sample_keys(storage) == {
        **{s: [f"x{s}a", f"x{s}b", f"x{s}c"] for s in range(1, 5)},
        **{s: [f"y{s}a", f"y{s}b", f"y{s}c"] for s in range(5, 9)},
    }
    lines = read_sample_key_lines(storage)
    starts = [line["start_step"] for line in lines if "start_step" in line]
    cut_off = [line["step"] for line in lines if "keys" in line and line["keys"][0].startswith("x")]
    assert starts == [0, 4] and cut_off == [s for s in range(1, 7) for _ in (0, 1)]  # the cut-off lines stay


def test_a_resumed_attempt_supersedes_the_steps_after_its_checkpoint(tmp_path):
    storage = str(tmp_path / "run")
    _attempt(storage, 0, 0, range(1, 7), "x", resumed=False)
    with open(Path(storage) / "sample_keys.jsonl", "a", encoding="utf-8") as f:
        f.write('{"attempt": "x", "step": 7, "rank": 0, "ke')  # the writer was killed mid-line
    _attempt(storage, 4, 1, range(5, 9), "y", resumed=True)
    _check_superseded(storage)
    # A run that starts from scratch in the same folder starts the file anew.
    _attempt(storage, 0, 0, range(1, 3), "z", resumed=False)
    assert read_sample_keys(storage) == {1: ["z1a", "z1b", "z1c"], 2: ["z2a", "z2b", "z2c"]}


def test_sample_key_log_on_s3(moto_endpoint, monkeypatch):
    use_s3_from_environment(monkeypatch, moto_endpoint)
    bucket = new_bucket(moto_endpoint)
    storage = f"s3://{bucket}/runs/keys"
    log = SampleKeyLog(storage, 0, 0, resumed=False)
    log.record(1, 1, [["k1"], ["k2"]])
    log.flush()
    assert read_sample_keys(storage) == {1: ["k1", "k2"]}
    _attempt(storage, 0, 0, range(1, 7), "x", resumed=False)
    _attempt(storage, 4, 1, range(5, 9), "y", resumed=True)
    _check_superseded(storage)
    assert s3fs_for(moto_endpoint).exists(f"{bucket}/runs/keys/sample_keys.jsonl")


# ---------------------------------------------------------------- real Ray Train runs


def _keys_spec(storage: Path, data: Path):
    # Checkpoints every 3 steps only (3, 6, 9, ...: part-way through epochs) and at the end.
    return train_spec(str(storage), [str(data)], max_failures=1, debug={"log_sample_keys": True},
                      data={"shuffle_buffer": 4}, optim={"steps": BUDGET},
                      checkpoint={"every_steps": EVERY, "every_epochs": 1000, "keep_last": BUDGET})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("keys-data")
    write_shards(data, SIZES)
    return data


@pytest.fixture(scope="module")
def uninterrupted(ray_local, shards, tmp_path_factory) -> dict[int, list[str]]:
    torch.set_num_threads(1)
    spec = _keys_spec(tmp_path_factory.mktemp("keys") / "whole", shards)
    assert run_train(spec, progress=False)["steps"] == BUDGET
    return read_sample_keys(spec.storage)


def test_an_uninterrupted_run_trains_on_every_sample_once_per_epoch(uninterrupted):
    every_sample = sorted(f"{i:06d}" for i in range(sum(SIZES)))
    assert sorted(uninterrupted) == list(range(1, BUDGET + 1))
    assert all(len(keys) == 8 for keys in uninterrupted.values())  # the global batch
    for first in range(1, BUDGET + 1, STEPS_PER_EPOCH):
        epoch = sorted(k for step in range(first, first + STEPS_PER_EPOCH) for k in uninterrupted[step])
        assert epoch == every_sample, first
    # Shuffled, and anew each epoch.
    assert uninterrupted[1] != every_sample[:8] and uninterrupted[1] != uninterrupted[1 + STEPS_PER_EPOCH]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_and_resumed_run_trains_on_the_same_keys_in_every_step(uninterrupted, shards, tmp_path):
    spec = _keys_spec(tmp_path / "killed", shards)
    run = Path(spec.storage)
    with killing_rank_after_step(run, rank=1, after_step=KILL_AFTER) as killed:
        summary = run_train(spec, progress=False)

    assert killed and KILL_AFTER <= killed["step"] < BUDGET, killed
    assert summary["restarts"] == 1 and summary["steps"] == BUDGET
    resumed_at = json.loads((Path(summary["resumed_from"]) / "meta.json").read_text())["step"]
    assert resumed_at % EVERY == 0 and resumed_at % STEPS_PER_EPOCH, resumed_at  # part-way through an epoch
    assert read_sample_keys(spec.storage) == uninterrupted
    # What the killed attempt trained on after the checkpoint was the same as well (it is only superseded).
    lines = read_sample_key_lines(spec.storage)
    first_attempt = lines[0]["attempt"]
    replayed: dict[int, list[str]] = {}
    for line in lines:
        if line.get("attempt") == first_attempt and "keys" in line and line["step"] > resumed_at:
            replayed.setdefault(line["step"], []).extend(line["keys"])
    assert replayed and all(sorted(keys) == uninterrupted[step] for step, keys in replayed.items()
                            if len(keys) == 8)
    assert [line["start_step"] for line in lines if "start_step" in line] == [0, resumed_at]
