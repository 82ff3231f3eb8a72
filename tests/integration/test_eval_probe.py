"""Linear and few-shot probes: IDX files, the logistic regression against sklearn, the CLIP protocol, the job."""
from __future__ import annotations

import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression

from clipforge.eval.evaluator import run_eval
from clipforge.eval.idx import read_idx, read_idx_images
from clipforge.eval.probe import (
    few_shot_probe,
    few_shot_sample,
    fit_logistic,
    linear_probe,
    predict_logits,
    select_weight_decay,
    stratified_split,
)
from clipforge.eval.spec import EvalSpec
from clipforge.models.spec import ModelSpec

torch.set_num_threads(1)

MODEL = ModelSpec(name="tiny", init_seed=7)
FASHION = "fashion-mnist"


def write_idx(path, array: np.ndarray, gz: bool = False) -> str:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def class_images(n_per_class: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images whose class sets where a bright band lies; noise on top. Labels interleaved."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(n_classes, dtype=np.uint8), n_per_class)
    images = rng.integers(0, 90, (len(labels), 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 4 + 7 * int(c) : 9 + 7 * int(c)] += 150
    return images, labels


def clusters(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    y = torch.arange(n_classes).repeat(n_per_class)
    x = F.normalize(centres[y] + spread * torch.randn(len(y), dim, generator=g), dim=-1)
    return x, y


def fashion_files(data_cache):
    found = {p.name: p for p in data_cache.rglob("*ubyte*") if FASHION in str(p)}
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    if not all(n in found for n in names):
        pytest.skip(f"Fashion-MNIST IDX files not in {data_cache}")
    return [str(found[n]) for n in names]


# ---------------------------------------------------------------- IDX files


def test_idx_round_trip_plain_and_gzipped(tmp_path):
    images, labels = class_images(3, 4, seed=0)
    for gz in (False, True):
        xi = write_idx(tmp_path / f"x{gz}", images, gz)
        yi = write_idx(tmp_path / f"y{gz}", labels, gz)
        x, y = read_idx_images(xi, yi)
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, labels.astype(np.int64))


def test_idx_errors_name_the_file_and_problem(tmp_path):
    images, labels = class_images(2, 3, seed=1)
    good_x = write_idx(tmp_path / "x.idx", images)
    (tmp_path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(ValueError, match=r"text\.idx: not an IDX file"):
        read_idx(str(tmp_path / "text.idx"))
    cut = tmp_path / "cut.idx"
    cut.write_bytes((tmp_path / "x.idx").read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"cut\.idx: IDX shape \[6, 28, 28\] needs 4704 bytes of values, the file "
                                         r"holds 4699"):
        read_idx(str(cut))
    short_y = write_idx(tmp_path / "y.idx", labels[:-1])
    with pytest.raises(ValueError, match=r"x\.idx holds 6 images but .*y\.idx holds 5 labels"):
        read_idx_images(good_x, short_y)
    with pytest.raises(ValueError, match="expected uint8 images"):
        read_idx_images(short_y, short_y)
    with pytest.raises(ValueError, match="IDX file not found"):
        read_idx(str(tmp_path / "missing.gz"))
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=r"bad\.gz: corrupt gzip data"):
        read_idx(str(tmp_path / "bad.gz"))


def test_real_fashion_mnist_idx(data_cache):
    train_x, train_y, test_x, test_y = fashion_files(data_cache)
    x, y = read_idx_images(train_x, train_y)
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10
    x, y = read_idx_images(test_x, test_y)
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    assert 0 < x.mean() < 255  # real pictures, not an empty buffer


# ---------------------------------------------------------------- the logistic regression


@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1])
def test_fit_logistic_equals_sklearn(weight_decay):
    x, y = clusters(30, 4, 8, spread=0.9, seed=0)
    weight, bias = fit_logistic(x, y, 4, weight_decay)
    ref = LogisticRegression(C=1.0 / (weight_decay * len(x)), tol=1e-12, max_iter=10_000).fit(x.double(), y)
    ours = torch.softmax(predict_logits(x, weight, bias), dim=1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x.double().numpy()), atol=2e-5)
    # Softmax weights are defined up to a per-feature shift across classes; sklearn's are centred.
    np.testing.assert_allclose((weight - weight.mean(dim=1, keepdim=True)).numpy(), ref.coef_.T, atol=2e-3)


def test_fit_is_deterministic_and_regularisation_shrinks_weights():
    x, y = clusters(20, 3, 6, spread=0.7, seed=1)
    a = fit_logistic(x, y, 3, 1e-3)
    b = fit_logistic(x, y, 3, 1e-3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert fit_logistic(x, y, 3, 1.0)[0].norm() < 0.5 * a[0].norm()


def test_stratified_split_is_seeded_disjoint_and_per_class():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    tr, va = stratified_split(y, 3, 0.2, seed=0)
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(y)))
    assert torch.bincount(y[va], minlength=3).tolist() == [2, 1, 1]
    same = stratified_split(y, 3, 0.2, seed=0)
    assert torch.equal(same[0], tr) and torch.equal(same[1], va)
    assert any(not torch.equal(stratified_split(y, 3, 0.2, seed=s)[1], va) for s in range(1, 6))
    with pytest.raises(ValueError, match="class 1 has 1 training image"):
        stratified_split(torch.tensor([0, 0, 1]), 2, 0.2, 0)


def test_linear_probe_follows_the_protocol():
    x_all, y_all = clusters(45, 4, 16, spread=0.3, seed=2)  # interleaved labels: 25 then 20 per class
    x, y, xt, yt = x_all[:100], y_all[:100], x_all[100:], y_all[100:]
    wds = [1e-5, 1e-3, 1e-1, 10.0]
    got = linear_probe(x, y, xt, yt, 4, wds, val_fraction=0.25, seed=4)

    # By hand: the same split, the validation accuracy of every weight decay, the best one refitted on all.
    tr, va = stratified_split(y, 4, 0.25, seed=4)
    accs = {wd: (predict_logits(x[va], *fit_logistic(x[tr], y[tr], 4, wd)).argmax(1) == y[va]).double().mean().item()
            for wd in wds}
    best = max(accs.values())
    chosen = max(wd for wd, acc in accs.items() if acc == best)  # ties: the strongest regularisation
    assert got["weight_decay"] == chosen and got["val_acc1"] == pytest.approx(best)
    logits = predict_logits(xt, *fit_logistic(x, y, 4, chosen))
    assert got["acc1"] == pytest.approx((logits.argmax(1) == yt).double().mean().item())
    assert math.isnan(got["acc5"])  # 4 classes: acc5 undefined, as in CLIP_benchmark
    recalls = [(logits.argmax(1)[yt == c] == c).double().mean().item() for c in range(4)]
    assert got["mean_per_class_recall"] == pytest.approx(sum(recalls) / 4)
    assert (got["n_train"], got["n_val"], got["n_test"]) == (len(tr), len(va), 80)
    assert got["acc1"] > 0.5  # 4 separable clusters: far above chance
    assert linear_probe(x, y, xt, yt, 4, wds, val_fraction=0.25, seed=4) == got


def test_few_shot_samples_are_exact_nested_and_disjoint():
    y = torch.arange(5).repeat(12)
    for k in (1, 2, 4, 8):
        shots, val = few_shot_sample(y, 5, k, min(k, 4), seed=3)
        assert torch.bincount(y[shots], minlength=5).tolist() == [k] * 5
        assert torch.bincount(y[val], minlength=5).tolist() == [min(k, 4)] * 5
        assert not set(shots.tolist()) & set(val.tolist())
    one = set(few_shot_sample(y, 5, 1, 1, seed=3)[0].tolist())
    assert one <= set(few_shot_sample(y, 5, 8, 4, seed=3)[0].tolist())
    assert set(few_shot_sample(y, 5, 1, 1, seed=4)[0].tolist()) != one
    with pytest.raises(ValueError, match="16-shot probe with 4 validation image.* class 0 has 12"):
        few_shot_sample(y, 5, 16, 4, seed=0)


def test_few_shot_probe_per_k_equals_a_probe_on_the_sample():
    x, y = clusters(20, 3, 12, spread=1.0, seed=5)
    xt, yt = x[1::2], y[1::2]
    x, y = x[::2], y[::2]
    wds = [1e-4, 1e-2, 1.0]
    got = few_shot_probe(x, y, xt, yt, 3, shots=[1, 4], weight_decays=wds, val_shots=2, repeats=2, seed=11)
    assert set(got) == {f"{k}shot_{m}" for k in (1, 4) for m in ("acc1", "acc5", "mean_per_class_recall",
                                                                 "weight_decay")} | {"n_test"}
    accs = []
    for r in range(2):
        tr, va = few_shot_sample(y, 3, 4, 2, seed=11 + r)
        _, _, fit = select_weight_decay(x[tr], y[tr], x[va], y[va], 3, wds, 1000)
        accs.append((predict_logits(xt, *fit).argmax(1) == yt).double().mean().item())
    assert got["4shot_acc1"] == pytest.approx(sum(accs) / 2)
    assert math.isnan(got["1shot_acc5"]) and got["4shot_weight_decay"] in wds


# ---------------------------------------------------------------- the job


def _reference_embeddings(bundle, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        x = torch.stack([bundle.preprocess_val(Image.fromarray(im).convert("RGB")) for im in images])
        return F.normalize(bundle.model.encode_image(x), dim=-1)


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    train_x, train_y = class_images(8, 3, seed=10)
    test_x, test_y = class_images(4, 3, seed=11)
    return {"train": (write_idx(root / "train-images-idx3-ubyte.gz", train_x, gz=True),
                      write_idx(root / "train-labels-idx1-ubyte.gz", train_y, gz=True)),
            "test": (write_idx(root / "t10k-images-idx3-ubyte", test_x), write_idx(root / "t10k-labels-idx1-ubyte",
                                                                                   test_y)),
            "arrays": (train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64))}


def test_run_eval_linear_probe_and_few_shot_on_idx_files(ray_local, idx_data, tmp_path):
    from clipforge.models import create_model

    src = {split: {"kind": "idx", "images": idx_data[split][0], "labels": idx_data[split][1]}
           for split in ("train", "test")}
    wds = [1e-4, 1e-2, 1.0]
    spec = EvalSpec(kind="eval", storage=str(tmp_path / "out"), model=MODEL, model_label="rand",
                    tasks=[{"task": "linear_probe", "dataset": "bands", "train": src["train"], "test": src["test"],
                            "weight_decays": wds, "val_fraction": 0.25},
                           {"task": "few_shot", "dataset": "bands", "train": {**src["train"], "max_per_class": 6},
                            "test": src["test"], "shots": [1, 2], "val_shots": 2, "weight_decays": wds, "seed": 5}],
                    batch_size=8, scaling={"workers": 2, "cpus_per_worker": 0.5})
    results = run_eval(spec)
    assert [r["task"] for r in results] == ["linear_probe", "few_shot"]
    for r in results:
        on_disk = json.loads((tmp_path / "out" / f"bands_rand_tiny_en_{r['task']}.json").read_text())
        assert set(on_disk) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert on_disk["task"] == r["task"] and on_disk["pretrained"] == "rand"

    train_x, train_y, test_x, test_y = idx_data["arrays"]
    bundle = create_model(MODEL)
    x_train, x_test = _reference_embeddings(bundle, train_x), _reference_embeddings(bundle, test_x)
    want = linear_probe(x_train, train_y, x_test, test_y, 3, wds, val_fraction=0.25, seed=0)
    lp = results[0]["metrics"]
    for key in ("acc1", "mean_per_class_recall", "weight_decay", "val_acc1", "n_train", "n_val", "n_test"):
        assert lp[key] == pytest.approx(want[key], abs=1e-6), key
    assert math.isnan(lp["acc5"]) and (lp["n_classes"], lp["n_failed"]) == (3, 0)

    # max_per_class keeps the first 6 images of each class, in file order.
    first6 = np.concatenate([np.flatnonzero(train_y == c)[:6] for c in range(3)])
    first6.sort()
    want = few_shot_probe(x_train[first6], train_y[first6], x_test, test_y, 3, [1, 2], wds, val_shots=2, seed=5)
    fs = results[1]["metrics"]
    for key, value in want.items():
        if not math.isnan(value):
            assert fs[key] == pytest.approx(value, abs=1e-6), key
    assert fs["n_train_pool"] == 18


def test_run_eval_linear_probe_on_real_fashion_mnist(ray_local, data_cache, tmp_path):
    train_x, train_y, test_x, test_y = fashion_files(data_cache)
    spec = EvalSpec(kind="eval", storage=str(tmp_path / "out"), model=MODEL,
                    tasks=[{"task": "linear_probe", "dataset": "fashion_mnist",
                            "train": {"kind": "idx", "images": train_x, "labels": train_y, "max_per_class": 12},
                            "test": {"kind": "idx", "images": test_x, "labels": test_y, "max_per_class": 6},
                            "weight_decays": [1e-4, 1e-2, 1.0]}],
                    batch_size=16, scaling={"workers": 2, "cpus_per_worker": 0.5})
    metrics = run_eval(spec)[0]["metrics"]
    assert (metrics["n_train"] + metrics["n_val"], metrics["n_test"], metrics["n_classes"]) == (120, 60, 10)
    # Even a random tiny tower separates Fashion-MNIST's classes well above chance (10 %).
    assert metrics["acc1"] > 0.3 and metrics["acc5"] > metrics["acc1"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| fashion_mnist | linear_probe |" in table


def test_probe_spec_errors(idx_data, tmp_path):
    train = {"kind": "idx", "images": idx_data["train"][0], "labels": idx_data["train"][1]}
    with pytest.raises(ValueError, match="shots must be distinct"):
        EvalSpec(kind="eval", storage=str(tmp_path), model=MODEL,
                 tasks=[{"task": "few_shot", "dataset": "d", "train": train, "test": train, "shots": [2, 2]}])
    with pytest.raises(ValueError, match="weight decays must be > 0"):
        EvalSpec(kind="eval", storage=str(tmp_path), model=MODEL,
                 tasks=[{"task": "linear_probe", "dataset": "d", "train": train, "test": train,
                         "weight_decays": [0.0]}])
    spec = EvalSpec(kind="eval", storage=str(tmp_path), model=MODEL,
                    tasks=[{"task": "linear_probe", "dataset": "d", "train": {**train, "labels": train["images"]},
                            "test": train}])
    with pytest.raises(ValueError, match=r"task 'd' \(linear_probe\): .*expected a label vector"):
        run_eval(spec)
