"""Karpathy-split caption files -> train shards (one sample per caption) and retrieval shards (all captions per
image)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from clipforge.demo.data_tuxpaint import list_stamps
from clipforge.demo.debian import fetch_packages
from clipforge.pipeline.karpathy import KarpathyFormatError, write_shards

from build_outputs import tar_members


@pytest.fixture(scope="module")
def karpathy_set(data_cache, tmp_path_factory):
    """12 real Tux Paint stamps in Karpathy's layout: 6 train, 3 val, 3 test, with 2-3 captions each."""
    stamps = [s for s in list_stamps(fetch_packages(data_cache)) if not s.mirrored][:12]
    root = tmp_path_factory.mktemp("karpathy")
    images = root / "images"
    images.mkdir()
    entries = []
    for i, stamp in enumerate(stamps):
        name = f"{i:04d}.png"
        shutil.copyfile(stamp.png, images / name)
        split = "train" if i < 5 else "restval" if i == 5 else "val" if i < 9 else "test"
        captions = [stamp.caption, f"a picture: {stamp.caption.lower()}"] + (["  spaced   caption "] if i % 2 else [])
        entries.append({"filename": name, "imgid": 100 + i, "split": split,
                        "sentences": [{"raw": c, "tokens": c.split()} for c in captions]})
    (root / "dataset.json").write_text(json.dumps({"dataset": "tuxpaint", "images": entries}))
    return root, entries


def test_splits_samples_and_captions(karpathy_set, tmp_path):
    root, entries = karpathy_set
    counts = write_shards(str(root / "dataset.json"), str(root / "images"), str(tmp_path / "out"), samples_per_shard=5)
    n_captions = {e["imgid"]: len(e["sentences"]) for e in entries}
    train_ids = [e["imgid"] for e in entries if e["split"] in ("train", "restval")]
    assert counts["train"] == {"images": 6, "samples": sum(n_captions[i] for i in train_ids), "shards": 3}
    assert counts["val"]["samples"] == 3 and counts["test"]["samples"] == 3

    train = tar_members(tmp_path / "out" / "train")
    assert len(train) == counts["train"]["samples"]
    first = entries[0]
    sample = train[f"{first['imgid']:09d}_1"]
    assert sample["txt"].decode() == first["sentences"][1]["raw"]
    assert sample["png"] == (root / "images" / first["filename"]).read_bytes()  # bytes copied unchanged

    test = tar_members(tmp_path / "out" / "test")
    last = entries[-1]
    lines = test[f"{last['imgid']:09d}"]["txt"].decode().splitlines()
    assert lines == [" ".join(s["raw"].split()) for s in last["sentences"]]
    assert json.loads((tmp_path / "out" / "splits.json").read_text())["splits"] == counts


def test_retrieval_shards_are_what_the_eval_reads(karpathy_set, tmp_path):
    """The eval's own shard reader sees one image with all its captions per test sample."""
    from collections import Counter

    from clipforge.eval.datasets import load_retrieval_webdataset

    root, entries = karpathy_set
    write_shards(str(root / "dataset.json"), str(root / "images"), str(tmp_path / "out"))
    items, captions, caption_image = load_retrieval_webdataset([str(tmp_path / "out" / "test")])
    expected = sorted(len(e["sentences"]) for e in entries if e["split"] == "test")
    assert len(items) == 3 and sorted(Counter(caption_image).values()) == expected


def test_bad_files_are_clear_errors(karpathy_set, tmp_path):
    root, _ = karpathy_set
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(KarpathyFormatError, match="images"):
        write_shards(str(tmp_path / "list.json"), str(root / "images"), str(tmp_path / "o1"))
    (tmp_path / "nosplit.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": []}]}))
    with pytest.raises(KarpathyFormatError, match=r"images\[0\] lacks 'split'"):
        write_shards(str(tmp_path / "nosplit.json"), str(root / "images"), str(tmp_path / "o2"))
    cmd = [sys.executable, "-m", "clipforge.pipeline.karpathy", "--karpathy", str(root / "dataset.json"),
           "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "0000.png of train is not under" in r.stderr
