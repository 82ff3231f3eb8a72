"""Training: shard reading and splitting, the schedule, and real Ray Train fits of the tiny model.

The Ray fits are few and combined (each costs Ray Train start-up): a full-model run that is then
resumed (in-process), and a heads-only run on cached features that checks the global-batch gather: its losses
and trained heads must equal those of one process with the whole global batch, and its first loss
a hand-written InfoNCE over the same samples with the same initial model.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.models import ModelSpec, create_model, head_parameter_names, load_model_state
from clipforge.models.checkpoint_files import load_optimizer_state
from clipforge.train.data import RankSamples, SkipCounter, Skipped, batches, plan_split, steps_per_epoch
from clipforge.train.loop import TrainingDiverged, train_worker
from clipforge.train.optimizer import build_optimizer, lr_at
from clipforge.train.run_checkpoints import ExistingRunError
from clipforge.train.shards import SampleKeys, ShardError, count_samples, expand_shards, iter_raw_samples
from clipforge.train.sources import NotEnoughData
from clipforge.train.spec import TrainSpec
from clipforge.train.trainer import run_train

from train_fixtures import picture, write_shards

KEYS = SampleKeys.parse("jpg;png;webp", "txt")


def _spec(tmp_path: Path, name: str, shards: list[str], **over) -> TrainSpec:
    data = {"shards": shards, "batch_size": 8, "loader_workers": 0, "shuffle_buffer": 0}
    data.update(over.pop("data", {}))
    raw = {
        "kind": "train", "name": name, "storage": str(tmp_path / name),
        "model": {"name": "tiny", "trainable": "all"}, "data": data,
        "optim": {"lr": 2e-3, "warmup_steps": 2, "epochs": 1, "weight_decay": 0.1},
        "checkpoint": {"every_epochs": 1, "keep_last": 1},
        "log_every_steps": 1, "scaling": {"workers": 2, "cpus_per_worker": 1},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return TrainSpec.model_validate(raw)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- shards, split, decode (no Ray)


def test_expand_shards_files_folders_globs_and_errors(tmp_path):
    a, b = write_shards(tmp_path / "d", [2, 3])
    (tmp_path / "d" / "stats.json").write_text("{}")
    (tmp_path / "d" / "manifest").mkdir()
    assert expand_shards([str(tmp_path / "d")]) == [str(a), str(b)]
    assert expand_shards([str(tmp_path / "d" / "*-00001.tar"), str(a), str(b)]) == [str(b), str(a)]
    with pytest.raises(ShardError, match="nope.tar` does not exist"):
        expand_shards([str(tmp_path / "nope.tar")])
    with pytest.raises(ShardError, match="matches no files"):
        expand_shards([str(tmp_path / "d" / "*.tgz")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="holds no \\*.tar"):
        expand_shards([str(tmp_path / "empty")])


def test_counts_and_reading_skip_incomplete_and_broken_tars(tmp_path):
    (shard,) = write_shards(tmp_path, [5])
    # A sample without caption and a member without extension are not samples.
    with tarfile.open(shard, "a") as tar:
        for name, data in (("000099.png", picture(0)[0]), ("README", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert count_samples(str(shard), KEYS) == 5
    assert [r.key for r in iter_raw_samples(str(shard), KEYS)] == [f"{i:06d}" for i in range(5)]
    # A shard cut off in the middle yields what precedes the damage, then stops without raising.
    cut = tmp_path / "cut.tar"
    data = shard.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    got = [r.key for r in iter_raw_samples(str(cut), KEYS)]
    assert 0 < len(got) < 5 and got == [f"{i:06d}" for i in range(len(got))]
    assert count_samples(str(cut), KEYS) >= len(got)


def test_plan_split_modes_cover_every_sample_once():
    plans = plan_split(["a", "b", "c", "d"], [10, 10, 9, 11], 2)
    assert [p.mode for p in plans] == ["shards", "shards"]
    assert sorted(plans[0].shards + plans[1].shards) == ["a", "b", "c", "d"]
    assert [p.num_samples for p in plans] == [20, 20]
    # Too unequal for whole shards: every rank reads everything and keeps every 2nd sample.
    plans = plan_split(["a", "b"], [100, 10], 2)
    assert [(p.mode, p.offset, p.stride, p.num_samples) for p in plans] == [("samples", 0, 2, 55),
                                                                            ("samples", 1, 2, 55)]
    plans = plan_split(["a"], [7], 3)
    assert [p.num_samples for p in plans] == [3, 2, 2]
    assert steps_per_epoch(plans, 2) == 1
    assert plan_split(["a", "b"], [4, 5], 2) == plan_split(["a", "b"], [4, 5], 2)


@pytest.mark.parametrize("sizes", [[9], [6, 5, 7], [6, 6, 5, 5]])
def test_rank_samples_partition_data_and_count_corrupt(tmp_path, sizes):
    shards = [str(p) for p in write_shards(tmp_path, sizes, corrupt={4})]
    total = sum(sizes)
    bundle = create_model(ModelSpec(name="tiny"))
    plans = plan_split(shards, [count_samples(s, KEYS) for s in shards], 2)
    assert plans[0].mode == ("shards" if len(sizes) == 4 else "samples")
    seen: list[tuple] = []
    skipped = SkipCounter()
    for plan in plans:
        ds = RankSamples(plan, KEYS, bundle.preprocess_val, bundle.tokenizer, seed=3, epoch=1, shuffle_buffer=4)
        items = list(ds)
        assert len(items) == plan.num_samples
        good = [it for it in items if not isinstance(it, Skipped)]
        for it in items:
            if isinstance(it, Skipped):
                skipped.add(it.reason)
                assert "000004: cannot decode" in it.reason
        for img, tok in good:
            assert img.shape == (3, 32, 32) and tok.dtype == torch.long
        seen += [tuple(t.tolist()) for _, t in good]  # captions are unique for fewer than 24 samples
        # Same seed and epoch -> same order; another epoch -> another order (with shuffling on).
        again = [it[1].tolist() for it in RankSamples(plan, KEYS, bundle.preprocess_val, bundle.tokenizer, 3, 1, 4)
                 if not isinstance(it, Skipped)]
        assert again == [t.tolist() for _, t in good]
    assert skipped.count == 1
    assert len(seen) == len(set(seen)) == total - 1
    out = list(batches(iter(RankSamples(plans[0], KEYS, bundle.preprocess_val, bundle.tokenizer, 0, 0, 0)),
                       2, SkipCounter()))
    assert all(img.shape[0] == 2 for img, _ in out)


def test_rank_samples_split_over_loader_processes(tmp_path):
    shards = [str(p) for p in write_shards(tmp_path, [10])]
    bundle = create_model(ModelSpec(name="tiny"))
    (plan,) = plan_split(shards, [10], 1)
    ds = RankSamples(plan, KEYS, bundle.preprocess_val, bundle.tokenizer, seed=0, epoch=0, shuffle_buffer=0)
    single = sorted(tuple(t.tolist()) for _, t in ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    multi = sorted(tuple(t.tolist()) for _, t in loader)
    assert multi == single and len(single) == 10


# ---------------------------------------------------------------- optimisation (no Ray)


def test_schedule_and_weight_decay_groups():
    peak = 1e-3
    assert lr_at(0, peak, 4, 20) == pytest.approx(peak / 4)
    assert lr_at(3, peak, 4, 20) == pytest.approx(peak)
    assert lr_at(4, peak, 4, 20) == pytest.approx(peak)
    assert lr_at(12, peak, 4, 20) == pytest.approx(peak / 2)
    assert lr_at(20, peak, 4, 20) == pytest.approx(0.0, abs=1e-12)
    bundle = create_model(ModelSpec(name="tiny"))
    opt = build_optimizer(bundle.model, TrainSpec.model_fields["optim"].default_factory())
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in bundle.model.named_parameters()}
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in no_decay_names and any(n.endswith(".bias") for n in no_decay_names)
    assert any("ln" in n and n.endswith("weight") for n in no_decay_names)
    heads = create_model(ModelSpec(name="tiny", trainable="heads"))
    opt = build_optimizer(heads.model, TrainSpec.model_fields["optim"].default_factory())
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {n for n, p in heads.model.named_parameters() if id(p) in trained} == set(head_parameter_names(heads.model))


def test_single_process_errors_name_the_problem(tmp_path):
    torch.set_num_threads(1)
    shards = [str(p) for p in write_shards(tmp_path / "d", [12])]
    too_big = _spec(tmp_path, "too-big", shards, data={"batch_size": 16}, scaling={"workers": 1})
    with pytest.raises(NotEnoughData, match="rank 0 has 12 usable samples .* local batch of 16"):
        train_worker(too_big)
    # A learning rate near float32's limit overflows the activations after the first update.
    diverge = _spec(tmp_path, "diverge", shards, optim={"lr": 1e36, "warmup_steps": 0, "epochs": 3},
                    scaling={"workers": 1})
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step 2 \(epoch 2\)"):
        train_worker(diverge)


# ---------------------------------------------------------------- Ray Train fits


def _expected_first_loss(shard: str, n: int) -> float:
    """Symmetric InfoNCE of the untrained tiny model over samples 0..n-1, in one process, written out by hand."""
    bundle = create_model(ModelSpec(name="tiny", trainable="heads"))
    raws = list(iter_raw_samples(shard, KEYS))[:n]
    images = torch.stack([bundle.preprocess_val(Image.open(io.BytesIO(r.image)).convert("RGB")) for r in raws])
    tokens = bundle.tokenizer([r.text.decode() for r in raws])
    with torch.no_grad():
        img, txt, scale = bundle.model(images, tokens)
        logits = scale * img @ txt.T
        labels = torch.arange(n)
        return float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)


@pytest.mark.timeout(600)
def test_full_model_training_checkpoints_and_resume(tmp_path, ray_local):
    torch.set_num_threads(1)
    # Two shards of 17 with one undecodable sample: 16 usable per rank, 4 steps per epoch, no crash.
    shards = [str(tmp_path / "data")]
    write_shards(tmp_path / "data", [17, 17], corrupt={5})
    # No shuffling here, so the bad sample is always read before a rank's 16 good ones are used up.
    spec = _spec(tmp_path, "full", shards, optim={"epochs": 2})
    run = Path(spec.storage)
    summary = run_train(spec)

    assert summary["steps"] == 8 and summary["epochs"] == 2 and summary["samples_seen"] == 64
    assert summary["skipped_samples"] == 2  # the bad sample, once per epoch
    assert summary["samples_per_second"] > 0 and summary["wall_seconds"] > 0
    assert json.loads((run / "summary.json").read_text()) == summary
    assert "kind: train" in (run / "spec.yaml").read_text()
    lines = _metrics(run)
    assert [m["step"] for m in lines] == list(range(1, 9))
    keys = {"step", "epoch", "loss", "lr", "logit_scale", "samples_per_second", "step_time", "time", "samples_seen"}
    assert all(keys <= set(m) for m in lines)
    assert [m["epoch"] for m in lines] == [1] * 4 + [2] * 4
    assert lines[0]["lr"] == pytest.approx(spec.optim.lr / 2)
    assert lines[-1]["samples_seen"] == 64 and lines[-1]["loss"] == pytest.approx(summary["final_loss"])
    # keep_last=1: only the newest complete checkpoint survives.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0002"]
    assert summary["checkpoint"] == str(run / "checkpoints" / "epoch_0002")
    meta = json.loads((run / "checkpoints" / "epoch_0002" / "meta.json").read_text())
    assert (meta["step"], meta["epoch"], meta["model_name"]) == (8, 2, "tiny")

    # A directory cut off before meta.json is not a checkpoint: resume must skip it and pruning must keep it.
    broken = run / "checkpoints" / "epoch_0099"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"partial")
    # Resumed in this process as a single worker with the same global batch (Ray start-up is the slow part
    # of a fit; the resume logic is the same). Worker count and shuffling may change on resume.
    longer = _spec(tmp_path, "full", shards, optim={"epochs": 4}, scaling={"workers": 1},
                   data={"shuffle_buffer": 8})
    resumed = train_worker(longer)

    assert resumed["resumed_from"] == str(run / "checkpoints" / "epoch_0002")
    assert resumed["steps"] == 16 and resumed["epochs"] == 4 and resumed["samples_seen"] == 128
    lines = _metrics(run)
    assert [m["step"] for m in lines] == list(range(1, 17))
    assert [m["epoch"] for m in lines[8:]] == [3] * 4 + [4] * 4
    # The schedule continues at step 9 of a 16-step run, not from warmup.
    assert lines[8]["lr"] == pytest.approx(lr_at(8, spec.optim.lr, 2, 16))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0004", "epoch_0099"]
    # AdamW state was restored: its step counter covers both runs.
    opt_state = load_optimizer_state(str(run / "checkpoints" / "epoch_0004"))
    assert {int(s["step"]) for s in opt_state["state"].values()} == {16}
    # The loss went down over the four epochs.
    first = sum(m["loss"] for m in lines[:4]) / 4
    last = sum(m["loss"] for m in lines[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    # Resuming a finished run trains nothing; a fresh run refuses a folder that has checkpoints.
    again = train_worker(longer)
    assert (again["steps"], again["checkpoint"], again["samples_per_second"]) == (16, resumed["checkpoint"], 0.0)
    with pytest.raises(ExistingRunError, match="already holds checkpoint .*epoch_0004"):
        run_train(longer.model_copy(update={"resume": False}))
    # The trained weights load into a fresh model for evaluation.
    trained = create_model(ModelSpec(name="tiny", checkpoint=str(run)))
    final = load_model_state(str(run / "checkpoints" / "epoch_0004"))
    assert all(torch.equal(trained.model.state_dict()[k], v) for k, v in final.items())


@pytest.mark.timeout(600)
def test_heads_only_two_workers_match_one_process(tmp_path, ray_local):
    """The global batch is right: 2 Ray workers x 4 samples train exactly like 1 process x 8 samples.

    One shard and no shuffling: rank 0 gets samples 0, 2, 4, ... and rank 1 gets 1, 3, 5, ..., so step s
    of the 2-worker run sees samples 8s..8s+7, like step s of a single process with batch 8.
    """
    torch.set_num_threads(1)
    (shard,) = write_shards(tmp_path / "data", [24])
    common = {"model": {"trainable": "heads"}, "optim": {"epochs": 2, "lr": 5e-3}}
    summary = run_train(_spec(tmp_path, "ray-cached", [str(shard)], cache_frozen_features=True, **common))
    one = {"scaling": {"workers": 1}}
    train_worker(_spec(tmp_path, "one-cached", [str(shard)], cache_frozen_features=True, **common, **one))
    train_worker(_spec(tmp_path, "one-streamed", [str(shard)], cache_frozen_features=False, **common, **one))

    runs = {name: _metrics(tmp_path / name) for name in ("ray-cached", "one-cached", "one-streamed")}
    assert summary["steps"] == 6 and all(len(lines) == 6 for lines in runs.values())
    # Step 1's loss is the symmetric InfoNCE of the untrained model over samples 0..7, computed by hand.
    expected = _expected_first_loss(str(shard), 8)
    for name, lines in runs.items():
        assert math.isclose(lines[0]["loss"], expected, abs_tol=1e-5), (name, lines[0]["loss"], expected)
        # Gradients (gathered across ranks, averaged by DDP) match too: every later loss agrees.
        assert [m["loss"] for m in lines] == pytest.approx([m["loss"] for m in runs["one-cached"]], abs=1e-4)
    # Step 4 (first of epoch 2) sees step 1's batch again, after three updates.
    assert runs["ray-cached"][3]["loss"] < runs["ray-cached"][0]["loss"]

    untrained = create_model(ModelSpec(name="tiny", trainable="heads")).model
    heads = set(head_parameter_names(untrained))
    initial = untrained.state_dict()
    saved = load_model_state(summary["checkpoint"])
    reference = load_model_state(str(tmp_path / "one-cached"))
    assert set(saved) == set(initial) == set(reference)
    for k, v in saved.items():
        if k in heads:
            assert not torch.equal(v, initial[k]), k
            assert torch.allclose(v, reference[k], atol=1e-4), k
        else:
            # Frozen towers are bit-identical to the initial ones in the saved checkpoint.
            assert torch.equal(v, initial[k]), k
