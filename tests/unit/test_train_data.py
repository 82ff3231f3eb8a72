"""Training data: mixtures of sources, resampling, budgets, augmentation, exact mid-epoch positions, bad data.

Everything here runs in this process (no Ray): the samples, the streams and a single-rank loop are
the same code that every Ray Train worker runs.
"""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from clipforge.models import ModelSpec, create_model
from clipforge.train import budget
from clipforge.train.data import (
    RankSamples,
    ResampledSamples,
    SkipCounter,
    StreamPosition,
    WeightedShards,
    batches,
    plan_split,
    sample_loader,
    shard_probabilities,
    train_transform,
)
from clipforge.train.loop import train_worker
from clipforge.train.shards import SampleKeys, ShardError, count_samples
from clipforge.train.spec import OptimSpec, TrainSpec

from train_fixtures import picture, read_lines, step_lines, train_spec, truncate, write_shards

KEYS = SampleKeys.parse("png", "txt")


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return create_model(ModelSpec(name="tiny"))


# ---------------------------------------------------------------- spec


def test_spec_sources_budgets_augmentation_and_their_errors(tmp_path):
    base = {"kind": "train", "storage": str(tmp_path), "model": {"name": "tiny"}}
    old = TrainSpec.model_validate({**base, "data": {"shards": ["a.tar"]}, "optim": {"epochs": 3}})
    assert old.data.source_list()[0].shards == ["a.tar"] and old.optim.epochs == 3 and old.resume is True
    # The dumped spec (what workers and spec.yaml get) validates again to the same spec.
    assert TrainSpec.model_validate(old.model_dump(mode="json")) == old
    mixed = TrainSpec.model_validate({**base, "resume": "auto", "data": {
        "resampled": True, "sources": [{"shards": ["a.tar"], "weight": 3}, {"shards": ["b/"]}],
        "augment": {"crop_scale": [0.5, 1.0], "horizontal_flip": True}}, "optim": {"steps": 50}})
    assert mixed.resume is True and [s.weight for s in mixed.data.sources] == [3.0, 1.0]
    assert (mixed.optim.epochs, mixed.optim.steps) == (None, 50)
    assert TrainSpec.model_validate(mixed.model_dump(mode="json")) == mixed
    assert OptimSpec().epochs == 1  # no length given: one epoch

    def error(**over) -> str:
        raw = {**base, "data": {"shards": ["a.tar"]}, **over}
        with pytest.raises(ValidationError) as e:
            TrainSpec.model_validate(raw)
        return str(e.value)

    assert "exactly one of data.shards and data.sources" in error(data={"shards": ["a"], "sources": [
        {"shards": ["b"]}]})
    assert "exactly one of data.shards and data.sources" in error(data={})
    assert "unequal weights need `data.resampled: true`" in error(data={"sources": [
        {"shards": ["a"], "weight": 2}, {"shards": ["b"]}]})
    assert "not epochs and steps" in error(optim={"epochs": 2, "steps": 10})
    assert "not steps and samples" in error(optim={"steps": 2, "samples": 10})
    assert "crop_scale must be [min, max]" in error(data={"shards": ["a"], "augment": {"crop_scale": [0.9, 0.5]}})
    assert "eval_every_steps is set but eval_tasks is empty" in error(eval_every_steps=5)
    assert "resume" in error(resume="sometimes")


def test_budgets_give_the_schedule_length():
    assert budget.total_steps(OptimSpec(epochs=3), 7, 16) == 21
    assert budget.total_steps(OptimSpec(steps=10), 7, 16) == 10
    assert budget.total_steps(OptimSpec(samples=100), 7, 16) == 7  # rounded up to whole global batches
    assert budget.total_steps(OptimSpec(samples=96), 7, 16) == 6
    assert budget.finished(OptimSpec(epochs=2), 2, 5, 14) and not budget.finished(OptimSpec(epochs=2), 1, 14, 14)
    assert budget.finished(OptimSpec(steps=10), 0, 10, 10) and not budget.finished(OptimSpec(steps=10), 9, 9, 10)


# ---------------------------------------------------------------- streams


def test_resampled_stream_is_endless_and_follows_source_weights(tmp_path, tiny):
    # Source A: 8 samples in 2 shards; source B: 24 samples in 1 shard. Weights 3:1 -> 75% of samples from A,
    # although B holds three times as many samples.
    a = [str(p) for p in write_shards(tmp_path / "a", [5, 3], first=0)]
    b = [str(p) for p in write_shards(tmp_path / "b", [24], first=100)]
    sources = [WeightedShards(tuple(a), (5, 3), 3.0), WeightedShards(tuple(b), (24,), 1.0)]
    shards, probs = shard_probabilities(sources)
    # A draw yields a whole shard: expected samples per draw, A's shards together : B's shard = 3 : 1.
    assert shards == a + b
    assert (probs[0] * 5 + probs[1] * 3) / (probs[2] * 24) == pytest.approx(3.0) and probs[0] == probs[1]
    assert sum(probs) == pytest.approx(1.0)

    def captions(salt: int, n: int, loaders: int = 0) -> list[str]:
        ds = ResampledSamples(sources, KEYS, tiny.preprocess_val, lambda texts: texts, seed=0, epoch=1, rank=0,
                              shuffle_buffer=8, salt=salt)
        out = []
        for item in sample_loader(ds, loaders):
            out.append(item[1])
            if len(out) == n:
                return out

    drawn = captions(0, 400)  # 400 samples from 32: an endless stream
    from_a = sum(int(c.rsplit(" ", 1)[1]) < 100 for c in drawn)
    assert 0.68 < from_a / len(drawn) < 0.82, from_a
    assert len(set(drawn)) == 32
    assert captions(0, 60) == drawn[:60]  # reproducible...
    assert captions(5, 60) != drawn[:60]  # ...and a resumed stream (salt: its start step) is a new draw
    # With loader processes, each draws its own share of the stream.
    two = captions(0, 60, loaders=2)
    assert len(two) == 60 and two != drawn[:60]


@pytest.mark.parametrize("loaders", [0, 2, 3])
def test_a_saved_stream_position_continues_exactly_where_the_epoch_stopped(tmp_path, tiny, loaders):
    """Consume k batches, keep the position, start a new stream from it: together they equal the whole epoch.

    Five shards of unequal length, a shuffle buffer and undecodable samples: the loader processes run out at
    different times, and the resumed stream must still interleave them as the uninterrupted one did.
    """
    shards = [str(p) for p in write_shards(tmp_path, [7, 9, 6, 8, 5], corrupt=frozenset({3, 20}))]
    (plan,) = plan_split(shards, [count_samples(s, KEYS) for s in shards], 1)

    def epoch(limit: int | None = None, saved: StreamPosition | None = None):
        position = StreamPosition()
        position.start(max(1, loaders), saved.consumed if saved else None, saved.next_loader if saved else 0)
        ds = RankSamples(plan, KEYS, tiny.preprocess_val, tiny.tokenizer, seed=1, epoch=2, shuffle_buffer=4,
                         skip=tuple(position.consumed), rotation=position.next_loader, tag=True)
        skipped = SkipCounter()
        out = []
        for _, tokens in batches(sample_loader(ds, loaders), 5, skipped, position=position):
            out.append([tuple(t.tolist()) for t in tokens])
            if len(out) == limit:
                break
        return out, position, skipped

    whole, _, skipped = epoch()
    assert len(whole) == 6 and skipped.count == 2  # 35 samples, 2 undecodable: 6 batches of 5
    for cut in range(1, 6):
        first, position, _ = epoch(limit=cut)
        assert position.state()["consumed"] == position.consumed and sum(position.consumed) >= 5 * cut
        rest, _, _ = epoch(saved=position)
        assert first + rest == whole, (loaders, cut)


def test_augmentation_switches(tiny):
    """crop_scale replaces the model's random crop range; horizontal_flip mirrors about half of the images."""
    plain = train_transform(tiny.preprocess_train, (1.0, 1.0), False)
    flip = train_transform(tiny.preprocess_train, (1.0, 1.0), True)
    crop = next(t for t in plain.transforms if type(t).__name__ == "RandomResizedCrop")
    assert crop.scale == (1.0, 1.0)
    assert next(t for t in tiny.preprocess_train.transforms if type(t).__name__ == "RandomResizedCrop").scale != (1, 1)
    assert [type(t).__name__ for t in flip.transforms][:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    # A square picture with its colour in the top-left corner: the whole image is kept (scale 1, square aspect
    # ratios only for a square input at scale 1), so the only change is the mirror.
    im = Image.open(io.BytesIO(picture(24)[0])).convert("RGB")
    assert "corner" in picture(24)[1]
    crop.ratio = (1.0, 1.0)
    next(t for t in flip.transforms if type(t).__name__ == "RandomResizedCrop").ratio = (1.0, 1.0)
    torch.manual_seed(0)
    reference = plain(im)
    assert all(torch.equal(plain(im), reference) for _ in range(5))
    outs = [flip(im) for _ in range(40)]
    mirrored = sum(torch.allclose(o, reference.flip(-1), atol=1e-5) for o in outs)
    same = sum(torch.equal(o, reference) for o in outs)
    assert mirrored + same == 40 and 8 <= mirrored <= 32


# ---------------------------------------------------------------- a single-rank run on damaged data


def test_a_shard_cut_anywhere_is_reported_as_damaged(tmp_path):
    """tarfile ends a stream silently when it is cut exactly at a member header; that cut is caught too."""
    import tarfile

    from clipforge.train.shards import ReadStats, iter_raw_samples

    (shard,) = write_shards(tmp_path / "src", [6])
    whole = shard.read_bytes()
    stats = ReadStats()
    assert len(list(iter_raw_samples(str(shard), KEYS, stats))) == 6 and stats.broken_shards == []
    with tarfile.open(shard) as tar:
        headers = [m.offset for m in tar.getmembers()]
    cuts = headers[2:] + [headers[3] + 700, len(whole) // 2 + 3]  # at headers (silent in tarfile), inside data
    for cut in cuts:
        part = tmp_path / f"cut-{cut}.tar"
        part.write_bytes(whole[:cut])
        stats = ReadStats()
        keys = [r.key for r in iter_raw_samples(str(part), KEYS, stats)]
        assert stats.broken_shards == [str(part)], cut
        assert keys == [f"{i:06d}" for i in range(len(keys))] and len(keys) < 6


def test_damaged_samples_and_shards_are_skipped_counted_and_the_step_budget_is_exact(tmp_path):
    """A shard cut short and an undecodable image: training goes on, counts both, and stops at exactly
    optim.steps, over several epochs."""
    torch.set_num_threads(1)
    # No shuffling: each epoch reads the cut shard, then the other one with its undecodable sample 20.
    cut, good = write_shards(tmp_path / "data", [16, 16], corrupt=frozenset({20}))
    truncate(cut, 0.55)
    assert 0 < count_samples(str(cut), KEYS) < 16
    spec = train_spec(str(tmp_path / "run"), [str(tmp_path / "data")], scaling={"workers": 1},
                      optim={"steps": 9}, checkpoint={"every_steps": 4})
    summary = train_worker(spec)
    assert summary["steps"] == 9 and summary["samples_seen"] == 72
    lines = step_lines(read_lines((tmp_path / "run" / "metrics.jsonl").read_text()))
    assert [m["step"] for m in lines] == list(range(1, 10))
    epochs_started = lines[-1]["epoch"]
    assert epochs_started >= 3
    assert summary["skipped_shards"] == summary["skipped_samples"] == epochs_started
    with pytest.raises(ShardError, match=r"data.sources\[1\].shards: `.*nope` does not exist"):
        train_worker(train_spec(str(tmp_path / "run2"), None, scaling={"workers": 1}, data={
            "shards": None, "sources": [{"shards": [str(good)]}, {"shards": [str(tmp_path / "nope")]}]}))


def test_a_resampled_mixture_trains_for_a_sample_budget_and_resumes(tmp_path):
    torch.set_num_threads(1)
    a = write_shards(tmp_path / "a", [6, 6], first=0)
    b = write_shards(tmp_path / "b", [20], first=100)
    data = {"shards": None, "resampled": True, "loader_workers": 1, "shuffle_buffer": 8,
            "sources": [{"shards": [str(p) for p in a], "weight": 3}, {"shards": [str(b[0])], "weight": 1}]}
    # 60 samples in global batches of 8: 8 steps (rounded up); a nominal epoch is 32 samples = 4 steps.
    spec = train_spec(str(tmp_path / "run"), None, scaling={"workers": 1}, data=data, optim={"samples": 60},
                      checkpoint={"every_steps": 3, "keep_last": 1})
    summary = train_worker(spec)
    assert (summary["steps"], summary["epochs"], summary["samples_seen"]) == (8, 2, 64)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["epoch_0002"]
    longer = spec.model_copy(update={"optim": spec.optim.model_copy(update={"samples": 100})})
    resumed = train_worker(longer)
    assert resumed["steps"] == 13 and resumed["resumed_from"].endswith("epoch_0002")
    lines = step_lines(read_lines((tmp_path / "run" / "metrics.jsonl").read_text()))
    assert [m["step"] for m in lines] == list(range(1, 14))
    assert [m["epoch"] for m in lines] == [1] * 4 + [2] * 4 + [3] * 4 + [4]
