"""Eval data sources beyond WebDataset shards and image folders: image-path + caption tables, zero-shot on IDX
files, and every source read from s3:// (a real S3 API), each checked against the same data in the older form."""
from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from pydantic import ValidationError

from clipforge.eval.datasets import load_retrieval_table, load_retrieval_webdataset
from clipforge.eval.evaluator import run_eval
from clipforge.eval.loading import load_task
from clipforge.eval.spec import EvalSpec, RetrievalTask, ZeroShotTask

from s3_server import new_bucket, s3fs_for, use_s3_from_environment

torch.set_num_threads(1)

MODEL = {"name": "tiny", "init_seed": 11}
# Image i's captions; image CORRUPT's file is not a decodable PNG.
CAPTIONS = [["a red square", "a small red square"], ["a blue circle"], ["green stripes", "stripes", "lines"],
            ["noise"], ["a yellow star", "a bright star"], ["a purple dot"]]
CORRUPT = 3
CLASSES = ["ankle boot", "bag", "coat"]
PER_CLASS = 3  # zero-shot keeps the first 3 images of each class


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    pixels[:12] = rng.integers(0, 256, 3, dtype=np.uint8)  # a flat half: images differ in layout too
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _image_file(i: int) -> bytes:
    return b"\x89PNG truncated" if i == CORRUPT else _png(i)


def _write_idx(path: Path, array: np.ndarray) -> str:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))
    return str(path)


def _write_table(root: Path) -> None:
    """The captions above as a csv with relative paths, rows out of image order, plus a row naming a file that
    does not exist."""
    (root / "img").mkdir(parents=True)
    for i in range(len(CAPTIONS)):
        (root / "img" / f"{i}.png").write_bytes(_image_file(i))
    rows = [(f"img/{i}.png", caps[0]) for i, caps in enumerate(CAPTIONS)]
    rows += [(f"./img/{i}.png", cap) for i, caps in enumerate(CAPTIONS) for cap in caps[1:]]
    rows.insert(2, ("img/missing.png", "a picture that is not there"))
    lines = ["filepath,title"] + [f'{path},"{caption}"' for path, caption in rows]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    (root / "shards").mkdir()
    with wds.TarWriter(str(root / "shards" / "caps-000000.tar")) as sink:
        for i, caps in enumerate(CAPTIONS):
            sink.write({"__key__": f"{i:04d}", "png": _image_file(i), "txt": "\n".join(caps)})
    _write_table(root / "table")
    # Labelled grey images: IDX files, and the first PER_CLASS of each class as a class-per-folder tree.
    rng = np.random.default_rng(5)
    labels = np.tile(np.arange(len(CLASSES), dtype=np.uint8), 4)
    images = rng.integers(0, 100, (len(labels), 28, 28), dtype=np.uint8)
    for n, c in enumerate(labels):
        images[n, 3 + 8 * int(c) : 9 + 8 * int(c)] += 150
    (root / "idx").mkdir()
    _write_idx(root / "idx" / "images-idx3-ubyte.gz", images)
    _write_idx(root / "idx" / "labels-idx1-ubyte.gz", labels)
    for c, name in enumerate(CLASSES):
        (root / "folder" / name).mkdir(parents=True)
        for j, n in enumerate(np.flatnonzero(labels == c)[:PER_CLASS]):
            Image.fromarray(images[n]).save(root / "folder" / name / f"{j:02d}.png")
    return root


def _tasks(prefix: str, name: str = "") -> list[dict]:
    """The four tasks over the data under `prefix` (a local folder or an s3:// URL), datasets named `name`*."""
    return [
        {"task": "retrieval", "dataset": f"{name}caps_shards", "shards": [f"{prefix}/shards"], "recall_k": [1, 2, 4]},
        {"task": "retrieval", "dataset": f"{name}caps_table", "table": f"{prefix}/table/captions.csv",
         "recall_k": [1, 2, 4]},
        {"task": "zeroshot_classification", "dataset": f"{name}grey_folder", "image_folder": f"{prefix}/folder",
         "templates": "simple"},
        {"task": "zeroshot_classification", "dataset": f"{name}grey_idx", "templates": "simple", "classnames": CLASSES,
         "source": {"images": f"{prefix}/idx/images-idx3-ubyte.gz", "labels": f"{prefix}/idx/labels-idx1-ubyte.gz",
                    "max_per_class": PER_CLASS}},
    ]


@pytest.fixture(scope="module")
def job(ray_local, moto_endpoint, data) -> dict:
    """One eval job over the data from local paths and, uploaded to S3, from s3:// paths, writing to S3.

    One job, not two, because it is the slow part: images with the same bytes (shards, IDX files) are embedded
    once for both, and the table and folder images are read by the decode tasks from each place."""
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        # Set after Ray (and its workers) started: the job must hand them on.
        use_s3_from_environment(mp, moto_endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # no filesystem made under other settings
        fs = s3fs_for(moto_endpoint)
        bucket = new_bucket(moto_endpoint)
        fs.put(str(data), f"{bucket}/data", recursive=True)
        spec = EvalSpec.model_validate({
            "kind": "eval", "storage": f"s3://{bucket}/results", "model": MODEL,
            "tasks": _tasks(str(data)) + _tasks(f"s3://{bucket}/data", name="s3_"),
            "batch_size": 4, "scaling": {"workers": 2, "cpus_per_worker": 0.5}})
        results = run_eval(spec)
        stored = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/results", refresh=True))
        s3fs.S3FileSystem.clear_instance_cache()
    metrics = {r["dataset"]: r["metrics"] for r in results}
    return {"local": {k: v for k, v in metrics.items() if not k.startswith("s3_")},
            "s3": {k[len("s3_"):]: v for k, v in metrics.items() if k.startswith("s3_")}, "stored": stored}


# ---------------------------------------------------------------- tables (no Ray)


def test_table_groups_rows_of_one_image_in_first_appearance_order(data):
    items, captions, caption_image = load_retrieval_table(str(data / "table" / "captions.csv"), "filepath", "title")
    paths = [it["path"] for it in items]
    img = data / "table" / "img"
    assert paths == [str(img / "0.png"), str(img / "1.png"), str(img / "missing.png")] + [
        str(img / f"{i}.png") for i in range(2, len(CAPTIONS))]
    # Each image's captions together, in row order: the WebDataset's order once the missing image is left out.
    assert [it["idx"] for it in items] == list(range(len(items)))
    assert captions[:3] + captions[4:] == [c for caps in CAPTIONS for c in caps]
    assert captions[3] == "a picture that is not there" and caption_image[3] == 2
    assert caption_image == [0, 0, 1, 2] + [i + 1 for i in range(2, len(CAPTIONS)) for _ in CAPTIONS[i]]
    # Missing files are stamped as missing (the decode step skips them); present ones by size.
    assert json.loads(items[2]["stamp"]) == {"missing": True}
    assert json.loads(items[0]["stamp"])["size"] == len(_png(0))


def test_table_formats_and_caption_lists(tmp_path):
    (tmp_path / "pics").mkdir()
    absolute = str(tmp_path / "elsewhere" / "z.png")
    # parquet: a list column, and an absolute path.
    pq.write_table(pa.table({"img": ["pics/a.png", absolute], "caps": [["one", "uno"], ["two"]]}),
                   tmp_path / "t.parquet")
    items, captions, caption_image = load_retrieval_table(str(tmp_path / "t.parquet"), "img", "caps")
    assert [it["path"] for it in items] == [str(tmp_path / "pics" / "a.png"), absolute]
    assert (captions, caption_image) == (["one", "uno", "two"], [0, 0, 1])
    # jsonl: a JSON list, a list written as a string, and a repeated image.
    lines = [{"filepath": "pics/a.png", "title": ["one", "uno"]}, {"filepath": "pics/b.png", "title": '["two", "dos"]'},
             {"filepath": "pics/a.png", "title": "eins"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    items, captions, caption_image = load_retrieval_table(str(tmp_path / "t.jsonl"), "filepath", "title")
    assert (captions, caption_image) == (["one", "uno", "eins", "two", "dos"], [0, 0, 0, 1, 1])
    # gzipped tsv with bare quotes and a Python-style list; a bracketed caption that is no list stays one caption.
    tsv = "filepath\ttitle\npics/a.png\t['a \"big\" one', 'large']\npics/b.png\t[sic] two\npics/c.png\t[1, 2]\n"
    (tmp_path / "t.tsv.gz").write_bytes(gzip.compress(tsv.encode()))
    items, captions, caption_image = load_retrieval_table(str(tmp_path / "t.tsv.gz"), "filepath", "title")
    assert captions == ['a "big" one', "large", "[sic] two", "[1, 2]"] and caption_image == [0, 0, 1, 2]
    # A name that says no format needs `table_format`.
    (tmp_path / "list.txt").write_text("filepath,title\npics/a.png,one\n")
    with pytest.raises(ValueError, match=r"list\.txt: cannot tell the table format"):
        load_retrieval_table(str(tmp_path / "list.txt"), "filepath", "title")
    assert load_retrieval_table(str(tmp_path / "list.txt"), "filepath", "title", "csv")[1] == ["one"]


def test_table_errors_name_the_file_column_and_row(tmp_path):
    good = "filepath,title\na.png,one\n"
    (tmp_path / "ok.csv").write_text(good)
    with pytest.raises(ValueError, match=r"ok\.csv: column `image` \(image_column\) not found; the table has: "
                                         r"filepath, title"):
        load_retrieval_table(str(tmp_path / "ok.csv"), "image", "title")
    pq.write_table(pa.table({"filepath": ["a.png"], "text": ["one"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: column `title` \(caption_column\) not found"):
        load_retrieval_table(str(tmp_path / "t.parquet"), "filepath", "title")
    (tmp_path / "junk.parquet").write_bytes(b"this is no parquet file" * 4)
    with pytest.raises(ValueError, match=r"junk\.parquet: cannot read as parquet"):
        load_retrieval_table(str(tmp_path / "junk.parquet"), "filepath", "title")
    with pytest.raises(ValueError, match=r"absent\.csv: table not found"):
        load_retrieval_table(str(tmp_path / "absent.csv"), "filepath", "title")
    (tmp_path / "empty_caption.csv").write_text(good + "b.png,two\nc.png,  \n")
    with pytest.raises(ValueError, match=r"empty_caption\.csv: row 3 \(line 4\), column `title`: empty caption"):
        load_retrieval_table(str(tmp_path / "empty_caption.csv"), "filepath", "title")
    (tmp_path / "empty_list.jsonl").write_text('{"filepath": "a.png", "title": ["one", ""]}\n')
    with pytest.raises(ValueError, match=r"row 1 \(line 1\), column `title`: caption list .* non-empty strings"):
        load_retrieval_table(str(tmp_path / "empty_list.jsonl"), "filepath", "title")
    (tmp_path / "no_path.csv").write_text(good + ",two\n")
    with pytest.raises(ValueError, match=r"no_path\.csv: row 2 \(line 3\), column `filepath`: empty image path"):
        load_retrieval_table(str(tmp_path / "no_path.csv"), "filepath", "title")
    # Through the job's loader the task is named as well.
    task = RetrievalTask(task="retrieval", dataset="flickr", table=str(tmp_path / "ok.csv"), caption_column="caption")
    with pytest.raises(ValueError, match=r"task 'flickr' \(zeroshot_retrieval\): .*ok\.csv: column `caption` "
                                         r"\(caption_column\) not found"):
        load_task(task)


def test_spec_takes_exactly_one_source():
    base = {"kind": "eval", "storage": "s", "model": MODEL}
    with pytest.raises(ValidationError, match=r"exactly one of `shards` .* and `table` .*, not both"):
        EvalSpec.model_validate({**base, "tasks": [{"task": "retrieval", "dataset": "d", "shards": ["x.tar"],
                                                    "table": "t.csv"}]})
    with pytest.raises(ValidationError, match=r"exactly one of `shards` .* and `table` .*, not neither"):
        EvalSpec.model_validate({**base, "tasks": [{"task": "retrieval", "dataset": "d"}]})
    with pytest.raises(ValidationError, match="caption_column applies to `table` only"):
        RetrievalTask(task="retrieval", dataset="d", shards=["x.tar"], caption_column="text")
    table = RetrievalTask(task="retrieval", dataset="d", table="t.csv")
    assert (table.image_column, table.caption_column, table.shards) == ("filepath", "title", None)

    with pytest.raises(ValidationError, match="exactly one of `image_folder` and `source`.*, not both"):
        ZeroShotTask(task="zeroshot_classification", dataset="z", image_folder="f", source={"path": "f"})
    with pytest.raises(ValidationError, match="exactly one of `image_folder` and `source`.*, not neither"):
        ZeroShotTask(task="zeroshot_classification", dataset="z")
    with pytest.raises(ValidationError, match="IDX files carry no class names: give `classnames`"):
        ZeroShotTask(task="zeroshot_classification", dataset="z", source={"images": "x", "labels": "y"})
    # `kind` is told by the fields; the old form is the same source.
    by_fields = ZeroShotTask(task="zeroshot_classification", dataset="z", source={"path": "f", "max_per_class": 2})
    assert by_fields.labelled_source().kind == "image_folder" and by_fields.labelled_source().max_per_class == 2
    old = ZeroShotTask(task="zeroshot_classification", dataset="z", image_folder="f")
    assert old.labelled_source().path == "f" and old.source is None

    # Made absolute for processes in other directories (the trainer's workers); URLs stay as they are.
    cwd = Path.cwd()
    assert table.with_absolute_paths().table == str(cwd / "t.csv")
    assert RetrievalTask(task="retrieval", dataset="d", shards=["s3://b/x", "y"]).with_absolute_paths().shards == [
        "s3://b/x", str(cwd / "y")]
    assert by_fields.with_absolute_paths().source.path == str(cwd / "f")
    idx = ZeroShotTask(task="zeroshot_classification", dataset="z", classnames=["a"],
                       source={"images": "s3://b/i.gz", "labels": "l.gz"}).with_absolute_paths().source
    assert (idx.images, idx.labels) == ("s3://b/i.gz", str(cwd / "l.gz"))
    assert old.with_absolute_paths().image_folder == str(cwd / "f")


def test_idx_labels_beyond_the_classnames_are_an_error(data):
    task = ZeroShotTask(task="zeroshot_classification", dataset="grey", classnames=CLASSES[:2],
                        source={"images": str(data / "idx" / "images-idx3-ubyte.gz"),
                                "labels": str(data / "idx" / "labels-idx1-ubyte.gz")})
    with pytest.raises(ValueError, match=r"task 'grey' .*labels-idx1-ubyte\.gz holds label 2 but only 2 classnames"):
        load_task(task)


# ---------------------------------------------------------------- the job


@pytest.mark.slow
def test_table_equals_shards_and_idx_equals_folder(job, data):
    local = job["local"]
    shards, table = local["caps_shards"], local["caps_table"]
    # The corrupt image is skipped either way; the table's missing file is one more skipped image, and the
    # captions of skipped images leave with them, so every recall is the same.
    assert (shards["n_images"], shards["n_texts"], shards["n_failed"]) == (5, 9, 1)
    assert (table["n_images"], table["n_texts"], table["n_failed"]) == (5, 9, 2)
    recalls = [k for k in shards if "recall@" in k]
    assert len(recalls) == 6
    assert {k: table[k] for k in recalls} == {k: shards[k] for k in recalls}
    assert len({shards[k] for k in recalls}) > 1  # not all equal: the comparison can fail

    folder, idx = local["grey_folder"], local["grey_idx"]
    assert (idx["n_images"], idx["n_classes"], idx["n_failed"]) == (len(CLASSES) * PER_CLASS, len(CLASSES), 0)
    assert json.dumps(idx, sort_keys=True) == json.dumps(folder, sort_keys=True)
    # The images really are the same: IDX items embed PNGs of the arrays the folder holds.
    items, _, _ = load_retrieval_webdataset([str(data / "shards")])
    assert items[0]["bytes"] == (data / "table" / "img" / "0.png").read_bytes()


@pytest.mark.slow
def test_every_source_from_s3_gives_the_local_metrics(job):
    assert sorted(job["s3"]) == sorted(job["local"]) and len(job["local"]) == 4
    assert json.dumps(job["s3"], sort_keys=True) == json.dumps(job["local"], sort_keys=True)
    assert job["s3"]["caps_table"]["n_failed"] == 2
    assert {"results.jsonl", "s3_caps_table_clipforge_tiny_en_zeroshot_retrieval.json"} <= set(job["stored"])
