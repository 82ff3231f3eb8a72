"""A checkpoint written by clipforge loads in plain open_clip (`local-dir:`): same model, transform, tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.models import ModelSpec, create_model, load_model_state, save_checkpoint
from clipforge.models.checkpoint_files import META_FILE, MODEL_FILE
from clipforge.models.losses import ClipLoss
from clipforge.models.open_clip_folder import OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE
from clipforge.models.tokenizer_bpe import train_bpe_tokenizer

torch.set_num_threads(1)  # the test machine is small and shared: one thread is the fastest there
CAPTIONS = ["a red square on a white ground", "Two BLUE circles,  side by side", "a photo of a cat",
            "an emoji of a smiling face with sunglasses and a very long caption that goes on " * 3]


def image_files(folder: Path) -> list[Path]:
    """PNG and JPEG files of different sizes and aspect ratios (so resizing and cropping matter)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir()
    files = []
    for i, (size, fmt) in enumerate([((64, 48), "PNG"), ((37, 90), "JPEG"), ((300, 200), "PNG"), ((80, 80), "JPEG")]):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(255, 0, i * 60))
        path = folder / f"image{i}.{fmt.lower()}"
        image.save(path, format=fmt)
        files.append(path)
    return files


def trained_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The model after two optimizer steps on random data: weights that no initialisation reproduces."""
    bundle = create_model(spec)
    model = bundle.model.train()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        loss = ClipLoss()(*model(torch.randn(4, 3, size, size, generator=g), bundle.tokenizer(CAPTIONS)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().state_dict()


def embeddings(model, preprocess, tokenizer, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from PIL import Image

    images = torch.stack([preprocess(Image.open(f)) for f in files])
    tokens = tokenizer(CAPTIONS)
    with torch.no_grad():
        return images, model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def assert_same_model(checkpoint: str, spec: ModelSpec, files: list[Path]) -> None:
    import open_clip

    ours = create_model(spec.model_copy(update={"checkpoint": checkpoint}))
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{checkpoint}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{checkpoint}")
    assert torch.equal(ours.tokenizer(CAPTIONS), tokenizer(CAPTIONS))
    our_pixels, our_images, our_texts = embeddings(ours.model, ours.preprocess_val, ours.tokenizer, files)
    pixels, images, texts = embeddings(theirs.eval(), preprocess, tokenizer, files)
    assert torch.equal(our_pixels, pixels)
    for ours_emb, theirs_emb in ((our_images, images), (our_texts, texts)):
        assert torch.nn.functional.cosine_similarity(ours_emb, theirs_emb).min() > 0.9999
        assert torch.allclose(ours_emb, theirs_emb, atol=1e-5)


def test_tiny_checkpoint_of_a_training_run_loads_in_open_clip(tmp_path):
    """A training run's meta carries its spec: the checkpoint is an open_clip folder without being asked."""
    spec = ModelSpec(name="tiny", init_seed=3)
    state = trained_state(spec)
    meta = {"step": 2, "spec": {"kind": "train", "model": spec.model_dump(mode="json")}}
    checkpoint = save_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_00000002"), state, meta)

    assert_same_model(checkpoint, spec, image_files(tmp_path / "images"))
    config = json.loads((Path(checkpoint) / OPEN_CLIP_CONFIG_FILE).read_text())
    assert "clipforge" not in config["model_cfg"] and config["clipforge"]["model"]["name"] == "tiny"
    # clipforge's own reading of the folder is unchanged: meta.json records its files only, the weights load.
    assert set(json.loads((Path(checkpoint) / META_FILE).read_text())["files"]) == {MODEL_FILE}
    assert all(torch.equal(state[k], v) for k, v in load_model_state(checkpoint).items())
    # The weights file open_clip reads is model.pt itself, not a second copy.
    assert os.path.samefile(Path(checkpoint) / MODEL_FILE, Path(checkpoint) / OPEN_CLIP_WEIGHTS_FILE)


def test_demo_model_with_its_own_mean_and_std_loads_in_open_clip(tmp_path):
    """The demo model: a timm EfficientNet and a Hugging Face MiniLM named by `pkg:` references, images scaled to
    [-1, 1] (mean = std = 0.5, not open_clip's default OpenAI statistics)."""
    spec = ModelSpec(name="miniclip-effnet-minilm", trainable="heads")
    checkpoint = save_checkpoint(str(tmp_path / "ckpt"), trained_state(spec), {"step": 2}, model_spec=spec)

    config = json.loads((Path(checkpoint) / OPEN_CLIP_CONFIG_FILE).read_text())
    assert config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5] and config["preprocess_cfg"]["std"] == [0.5, 0.5, 0.5]
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == os.path.abspath(checkpoint)
    assert "pkg:" not in json.dumps(config["model_cfg"])
    assert_same_model(checkpoint, spec, image_files(tmp_path / "images"))


def test_checkpoint_without_a_model_spec_is_left_as_it_was(tmp_path):
    checkpoint = Path(save_checkpoint(str(tmp_path / "ckpt"), {"w": torch.ones(2)}, {"step": 1}))
    assert sorted(p.name for p in checkpoint.iterdir()) == [META_FILE, MODEL_FILE]


def test_bpe_tokenizer_model_folder_carries_the_tokenizer(tmp_path):
    """A from-scratch text transformer with a clipforge BPE tokenizer: open_clip builds the model from the folder
    (the embedding table sized to the tokenizer); the tokenizer ships in the folder for clipforge's BPETokenizer."""
    import open_clip

    from clipforge.models import BPETokenizer

    tokenizer = train_bpe_tokenizer(CAPTIONS * 5, tmp_path / "bpe" / "tokenizer.json", vocab_size=300,
                                    min_frequency=1, context_length=32)
    spec = ModelSpec(name="tiny", tokenizer=tokenizer.path)
    checkpoint = save_checkpoint(str(tmp_path / "ckpt"), trained_state(spec), {}, model_spec=spec)
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{checkpoint}")
    ours = create_model(spec.model_copy(update={"checkpoint": checkpoint}))
    tokens = BPETokenizer(Path(checkpoint) / "tokenizer.json", context_length=32)(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(ours.model.encode_text(tokens), theirs.eval().encode_text(tokens), atol=1e-5)


@pytest.mark.parametrize("name", ["vit-s16-roberta-base"])
def test_hub_tower_names_stay_hub_names(tmp_path, name):
    """Towers named by hub name keep that name in model_cfg (open_clip loads them from the hub or its cache)."""
    from clipforge.models.open_clip_folder import open_clip_config
    from clipforge.models.resolved_config import resolved_config

    spec = ModelSpec(name=name, pretrained_towers=False)
    _, cfg, _, _ = resolved_config(spec)
    config = open_clip_config(spec, cfg, str(tmp_path))
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == "roberta-base"
    assert config["model_cfg"]["vision_cfg"]["timm_model_pretrained"] is False
    assert config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
