"""Deployment export on real demo images and captions: ONNX graphs vs PyTorch, int8, predict without torch, report."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from clipforge.export.errors import ExportError, ExportVerificationError
from clipforge.export.exporter import export_checkpoint
from clipforge.export.manifest import MANIFEST_FILE, ImagePreprocess, read_manifest
from clipforge.export.onnx_runtime import OnnxClip
from clipforge.export.preprocess import batch as preprocess_batch
from clipforge.export.preprocess import load_image
from clipforge.export.torch_backend import TorchClip, load_checkpoint_model
from clipforge.models import ModelSpec, create_model, save_checkpoint

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def demo(data_cache, tmp_path_factory):
    from clipforge.demo.offline_data import prepare_demo_data

    return prepare_demo_data(cache_dir=data_cache, out_dir=tmp_path_factory.mktemp("demo"), max_train=200,
                             heldout=40, fashion_per_class=5)


@pytest.fixture(scope="module")
def pairs(demo):
    """Real (image, caption) pairs of every demo source, with distinct captions."""
    rows = pd.read_parquet(demo.train_list).drop_duplicates("caption")
    picked = pd.concat([rows[rows.source == s].head(4) for s in ("emoji", "openclipart", "tuxpaint")])
    return [(load_image(demo.images_dir / p), c) for p, c in zip(picked.path, picked.caption)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    bundle = create_model(ModelSpec(name="tiny", init_seed=5))
    return save_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), bundle.model.state_dict(),
                           {"model_name": "tiny", "step": 3})


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny", int8=True)


def _run_cli(args: list[str]):
    from clipforge.cli import app

    return CliRunner().invoke(app, args)


def test_tiny_export_writes_graphs_tokenizer_and_manifest(tiny_export, tiny_checkpoint):
    out = tiny_export.directory
    m = read_manifest(out)
    for tower in (m.image, m.text):
        assert set(tower.files) == {"fp32", "int8"}
        fp32, int8 = (out / tower.files["fp32"]).stat().st_size, (out / tower.files["int8"]).stat().st_size
        assert int8 < 0.6 * fp32
    assert (out / m.tokenizer.file).is_file() and (out / m.tokenizer.vocab_file).is_file()
    assert m.tokenizer.kind == "clip_bpe" and m.tokenizer.context_length == 32
    assert m.opset >= 17 and m.normalized and m.embed_dim == 32

    bundle, _, _ = load_checkpoint_model(tiny_checkpoint)
    assert m.logit_scale == pytest.approx(bundle.model.logit_scale.exp().item())
    normalize = next(t for t in bundle.preprocess_val.transforms if type(t).__name__ == "Normalize")
    assert m.preprocess.size == (32, 32)
    assert m.preprocess.mean == pytest.approx(tuple(normalize.mean))
    assert m.preprocess.std == pytest.approx(tuple(normalize.std))
    fp32 = m.verification["fp32"]
    assert fp32["tokens_identical"]
    assert fp32["image_pipeline"]["max_abs_diff"] <= TOLERANCE
    assert fp32["text_graph"]["max_abs_diff"] <= TOLERANCE
    assert m.verification["int8"]["text_graph"]["mean_cosine"] > 0.98


def test_onnx_embeddings_match_torch_on_real_images(tiny_export, tiny_checkpoint, pairs):
    torch_clip = TorchClip(load_checkpoint_model(tiny_checkpoint)[0], device="cpu")
    onnx_clip = OnnxClip(tiny_export.directory, "fp32", device="cpu")
    images, captions = [p[0] for p in pairs], [p[1] for p in pairs]

    np.testing.assert_array_equal(onnx_clip.tokenizer(captions), torch_clip.tokenize(captions))
    np.testing.assert_allclose(onnx_clip.preprocess(images), torch_clip.preprocess(images), atol=1e-6)
    # Batch sizes other than the traced one (2) exercise the dynamic batch axis.
    for n in (1, 7, len(images)):
        ref_img, ref_txt = torch_clip.encode_images(images[:n]), torch_clip.encode_texts(captions[:n])
        got_img, got_txt = onnx_clip.encode_images(images[:n]), onnx_clip.encode_texts(captions[:n])
        assert got_img.shape == ref_img.shape == (n, 32)
        assert np.abs(got_img - ref_img).max() <= TOLERANCE
        assert np.abs(got_txt - ref_txt).max() <= TOLERANCE
        np.testing.assert_allclose(np.linalg.norm(got_img, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("resize_mode,size",
                         [("shortest", 48), ("longest", 48), ("squash", 40), ("shortest", (40, 56))])
def test_numpy_preprocessing_equals_open_clip_transform(pairs, resize_mode, size):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(size=size, resize_mode=resize_mode, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), fill_color=7)
    transform = image_transform_v2(cfg, is_train=False)
    hw = (size, size) if isinstance(size, int) else size
    ours = ImagePreprocess(size=hw, mean=cfg.mean, std=cfg.std, resize_mode=resize_mode, fill_color=7)
    # open_clip resizes before converting to RGB, so palette, grey and alpha images must come out the same too.
    images = [p[0] for p in pairs] + [pairs[0][0].convert("P"), pairs[1][0].convert("L"), pairs[2][0].convert("RGBA")]
    expected = torch.stack([transform(img) for img in images]).numpy()
    got = preprocess_batch(images, ours)
    assert got.shape == expected.shape == (len(images), 3, *hw)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_export_from_run_directory_uses_latest_checkpoint_and_spec_name(tiny_checkpoint, tmp_path):
    state = create_model(ModelSpec(name="tiny", init_seed=5)).model.state_dict()
    # meta as a trainer writes it, but with an unloadable model_name: the spec's name must be used.
    for epoch in (1, 2):
        save_checkpoint(str(tmp_path / "run" / "checkpoints" / f"epoch_{epoch:04d}"), state,
                        {"step": epoch * 10, "model_name": "no-such-model", "spec": {"model": {"name": "tiny"}}})
    result = _run_cli(["export", str(tmp_path / "run"), "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "fp32 check" in result.output
    m = read_manifest(tmp_path / "onnx")
    assert m.checkpoint.endswith("epoch_0002") and m.model_name == "tiny"
    assert set(m.image.files) == {"fp32"}


def test_export_errors_name_the_problem(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="format 'tflite'"):
        export_checkpoint(tiny_checkpoint, tmp_path / "a", fmt="tflite")
    missing = _run_cli(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")])
    assert missing.exit_code == 1 and "nowhere" in missing.output and "does not exist" in missing.output
    nameless = save_checkpoint(str(tmp_path / "nameless"), create_model(ModelSpec(name="tiny")).model.state_dict(), {})
    with pytest.raises(ExportError, match="--model"):
        export_checkpoint(nameless, tmp_path / "c")
    # fp32 graphs differ from PyTorch by ~1e-7; a tolerance below that must fail the export, leaving no manifest.
    with pytest.raises(ExportVerificationError, match="tolerance 1e-12"):
        export_checkpoint(tiny_checkpoint, tmp_path / "d", tolerance=1e-12)
    assert (tmp_path / "d" / "image.onnx").is_file() and not (tmp_path / "d" / MANIFEST_FILE).exists()


_NO_TORCH = """
import json, sys
for name in ("torch", "torchvision", "open_clip", "transformers", "timm"):
    sys.modules[name] = None  # any import of these now raises ImportError
import typer
from clipforge.cli.export import register
app = typer.Typer()
register(app)
@app.callback()
def _root(): pass
try:
    app(sys.argv[1:])
except SystemExit as e:
    loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in
                    ("torch", "torchvision", "open_clip", "transformers", "timm"))
    print("EXIT", e.code, json.dumps(loaded), file=sys.stderr)
"""


def _predict_without_torch(args: list[str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, "predict", *args, "--json"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert "EXIT 0 []" in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


def test_predict_runs_from_onnx_without_torch(tiny_export, tiny_checkpoint, pairs, tmp_path):
    image_path = tmp_path / "query.png"
    pairs[0][0].save(image_path)
    captions = [c for _, c in pairs[:5]]
    plot = tmp_path / "probs.png"
    fp32, _ = _predict_without_torch(["--model", str(tiny_export.directory), str(image_path), *captions,
                                      "--precision", "fp32", "--plot", str(plot)])
    assert fp32["backend"].startswith("ONNX fp32")
    probs = [p["probability"] for p in fp32["predictions"]]
    assert [p["caption"] for p in fp32["predictions"]] == captions
    assert sum(probs) == pytest.approx(1.0)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from clipforge.export.predict import predict

    reference = predict(TorchClip.from_checkpoint(tiny_checkpoint, device="cpu"), load_image(image_path), captions)
    np.testing.assert_allclose(probs, [p.probability for p in reference], atol=1e-5)

    int8, _ = _predict_without_torch(["--model", str(tiny_export.directory), str(image_path), *captions])
    assert int8["backend"].startswith("ONNX int8")  # `auto` prefers the int8 graphs when exported
    assert sum(p["probability"] for p in int8["predictions"]) == pytest.approx(1.0)


def test_predict_from_checkpoint_prints_a_ranked_table(tiny_checkpoint, pairs, tmp_path):
    image_path = tmp_path / "query.png"
    pairs[1][0].save(image_path)
    captions = [c for _, c in pairs[:4]]
    result = _run_cli(["predict", "--model", tiny_checkpoint, str(image_path), *captions])
    assert result.exit_code == 0, result.output
    assert "PyTorch fp32 on cpu" in result.output
    rows = [line.split(None, 2) for line in result.output.splitlines()[2:] if line.strip()]
    assert sorted(r[2] for r in rows) == sorted(captions)
    probs = [float(r[1]) for r in rows]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)
    bad = _run_cli(["predict", "--model", tiny_checkpoint, str(tmp_path / "missing.png"), "a cat"])
    assert bad.exit_code == 1 and "image not found" in bad.output


def test_zeroshot_ensembling_equals_eval_package(tiny_checkpoint, demo):
    from clipforge.eval.metrics import zeroshot_classifier
    from clipforge.eval.templates import get_templates
    from clipforge.export.zeroshot import class_embeddings

    bundle = load_checkpoint_model(tiny_checkpoint)[0]
    templates = get_templates("fashion_mnist")
    ours = class_embeddings(TorchClip(bundle, device="cpu"), demo.fashion_classnames, templates)
    theirs = zeroshot_classifier(bundle.model, bundle.tokenizer, demo.fashion_classnames, templates).T.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_export_report_on_fashion_folder(tiny_checkpoint, demo, tmp_path):
    from clipforge.export.export_report import REPORT_JSON, REPORT_MD, run_export_report

    report = run_export_report(tiny_checkpoint, demo.fashion_dir, tmp_path, classnames=demo.fashion_classnames,
                               repeats=2, threads=1, batch_sizes=(1, 4))
    assert json.loads((tmp_path / REPORT_JSON).read_text()) == json.loads(json.dumps(report))
    md = (tmp_path / REPORT_MD).read_text()
    assert "| int8 ONNX |" in md and "| fp32 PyTorch |" in md
    v = report["variants"]
    assert report["zeroshot_task"]["images"] == 50
    assert v["fp32_torch"]["size_ratio"] == 1.0
    assert 0.9 < v["fp32_onnx"]["size_ratio"] < 1.2 and v["int8_onnx"]["size_ratio"] < 0.5
    # fp32 ONNX computes the same function: the same predictions as PyTorch.
    assert v["fp32_onnx"]["top1_agreement"] == 1.0
    assert v["fp32_onnx"]["zeroshot"]["acc1"] == v["fp32_torch"]["zeroshot"]["acc1"]
    for variant in v.values():
        assert 0.0 <= variant["zeroshot"]["acc1"] <= 1.0
        for b in (1, 4):
            lat = variant["latency"][f"batch_{b}"]
            assert lat["runs"] == 2 and 0 < lat["image_ms"] and 0 < lat["text_ms"]
        assert variant["speedup"]["geomean"] == pytest.approx(
            math.sqrt(variant["speedup"]["batch_1"] * variant["speedup"]["batch_4"]), rel=1e-2)


def _train_heads(bundle, images, captions, steps: int) -> None:
    """Fit the demo model's random projection heads to real pairs (trunks frozen), so rankings mean something."""
    from clipforge.models import ClipLoss, ProjectionHeads, tower_features
    from clipforge.models.towers import freeze_trunks

    model = bundle.model
    freeze_trunks(model)
    pixels = torch.stack([bundle.preprocess_val(img) for img in images])
    with torch.no_grad():
        image_feats = torch.cat([tower_features(model, images=pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
        text_feats = tower_features(model, tokens=bundle.tokenizer(captions))
    heads = ProjectionHeads(model)
    optimizer = torch.optim.Adam([p for p in heads.parameters() if p.requires_grad], lr=2e-3)
    loss_fn = ClipLoss()
    for _ in range(steps):
        img, txt, scale = heads(image_feats, text_feats)
        loss = loss_fn(img, txt, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.slow
def test_demo_model_int8_ranks_the_right_caption(demo, tmp_path):
    # 16 pairs of each source: enough for the heads to separate, few enough to embed quickly on a CPU.
    rows = (pd.read_parquet(demo.train_list).drop_duplicates("caption").groupby("source").head(16)
            .reset_index(drop=True))
    images = [load_image(demo.images_dir / p) for p in rows.path]
    captions = list(rows.caption)
    bundle = create_model(ModelSpec(name="miniclip-effnet-minilm"))
    _train_heads(bundle, images, captions, steps=200)
    checkpoint = save_checkpoint(str(tmp_path / "ckpt"), bundle.model.state_dict(),
                                 {"model_name": "miniclip-effnet-minilm", "step": 1})

    result = export_checkpoint(checkpoint, tmp_path / "onnx", int8=True)
    m = result.manifest
    assert m.tokenizer.kind == "hf" and m.preprocess.size == (224, 224) and m.preprocess.mean == (0.5, 0.5, 0.5)
    assert m.verification["fp32"]["image_pipeline"]["max_abs_diff"] <= TOLERANCE
    assert m.verification["fp32"]["text_graph"]["max_abs_diff"] <= TOLERANCE

    # One query per source and then some: 16 images, each against the 16 captions.
    picks = [i for s in ("emoji", "openclipart", "tuxpaint") for i in rows.index[rows.source == s][:6]][:16]
    query_images, query_captions = [images[i] for i in picks], [captions[i] for i in picks]
    torch_clip = TorchClip(bundle, device="cpu")
    onnx_fp32 = OnnxClip(result.directory, "fp32", device="cpu")
    onnx_int8 = OnnxClip(result.directory, "int8", device="cpu")
    np.testing.assert_array_equal(onnx_int8.tokenizer(query_captions), torch_clip.tokenize(query_captions))

    def ranking(backend):
        return backend.encode_images(query_images) @ backend.encode_texts(query_captions).T

    torch_scores, fp32_scores, int8_scores = ranking(torch_clip), ranking(onnx_fp32), ranking(onnx_int8)
    truth = np.arange(len(picks))
    torch_hits = torch_scores.argmax(1) == truth
    int8_hits = int8_scores.argmax(1) == truth
    assert np.abs(fp32_scores - torch_scores).max() <= 2 * TOLERANCE
    assert torch_hits.mean() >= 0.8, f"heads did not learn the pairs: top-1 {torch_hits.mean():.2f}"
    assert int8_hits.mean() >= 0.8 and int8_hits.sum() >= torch_hits.sum() - 1, (torch_hits, int8_hits)
