"""Byte-level BPE tokenizer trained on captions: round trip, files, and a from-scratch text tower that uses it."""
from __future__ import annotations

import json

import pytest
import torch

from clipforge.models import ModelConfigError, ModelSpec, create_model
from clipforge.models.losses import ClipLoss
from clipforge.models.registry import CONFIG_DIR
from clipforge.models.tokenizer_bpe import BPETokenizer, normalize_caption, train_bpe_tokenizer

torch.set_num_threads(1)

CAPTIONS = [
    "a photo of a cat sleeping on a red sofa",
    "A dog running on the beach at sunset",
    "two birds flying over the sea",
    "a bowl of fruit on a wooden table",
    "the old red bus in the city",
    "a cat and a dog on the grass",
    "mountains covered with snow under a blue sky",
    "a man riding a bicycle in the rain",
] * 10
ODD = [
    "  Mixed   CASE\tand\nnew lines  ",
    "café, naïve, Ångström: déjà vu",
    "emoji 🐱🐶 and CJK 猫と犬",
    "numbers 3.14159 & symbols #@!$%^*()[]{}",
    "a word the corpus never saw: xylophonist",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=400,
                               context_length=24)


def test_normalisation():
    assert normalize_caption("  A  Cat\n on\tthe MAT ") == "a cat on the mat"
    assert normalize_caption("Cafe\u0301") == "caf\u00e9"  # NFC: combining accent folded


@pytest.mark.parametrize("text", CAPTIONS[:8] + ODD)
def test_round_trip_gives_the_normalised_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == normalize_caption(text)
    row = tokenizer([text], context_length=200)[0]
    assert tokenizer.decode(row) == normalize_caption(text)


def test_tensor_layout_follows_open_clip_conventions(tokenizer):
    out = tokenizer(["a cat", "word " * 100])
    assert out.dtype == torch.long and out.shape == (2, 24)
    assert (out[:, 0] == tokenizer.start_id).all()
    assert tokenizer.end_id == tokenizer.vocab_size - 1  # highest id: argmax pooling finds it
    n = len(tokenizer.encode("a cat"))
    assert out[0, n + 1] == tokenizer.end_id and (out[0, n + 2:] == tokenizer.pad_id).all()
    assert out[1, -1] == tokenizer.end_id and (out[1] != tokenizer.pad_id).all()  # truncated, still ends
    assert out.argmax(dim=1).tolist() == [n + 1, 23]


def test_training_learns_merges_from_the_corpus(tokenizer):
    # 256 byte symbols + 3 special tokens + merges, capped at the requested size (a small corpus runs out of merges).
    assert 300 < tokenizer.vocab_size <= 400
    assert len(tokenizer.encode("a photo of a cat sleeping on a red sofa")) < 12  # whole words merged
    assert len(tokenizer.encode("xylophonist")) > 3  # unseen word: pieces


def test_train_from_text_and_parquet_files_and_reload(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "captions.txt"
    txt.write_text("\n".join(CAPTIONS), encoding="utf-8")
    parquet = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": CAPTIONS, "url": ["u"] * len(CAPTIONS)}), parquet)
    from_txt = train_bpe_tokenizer(txt, tmp_path / "a.json", vocab_size=350)
    from_parquet = train_bpe_tokenizer(parquet, tmp_path / "b.json", vocab_size=350)
    reloaded = BPETokenizer(tmp_path / "a.json")
    text = "a cat running on the beach"
    assert from_txt.encode(text) == from_parquet.encode(text) == reloaded.encode(text)
    assert torch.equal(from_txt([text]), reloaded([text]))
    with pytest.raises(ValueError, match="no column 'text'"):
        train_bpe_tokenizer(parquet, tmp_path / "c.json", column="text")
    with pytest.raises(FileNotFoundError, match="not found"):
        train_bpe_tokenizer(tmp_path / "missing.txt", tmp_path / "d.json")
    with pytest.raises(ValueError, match="no text"):
        train_bpe_tokenizer(["", "   "], tmp_path / "e.json")
    with pytest.raises(ModelConfigError, match="missing.json"):
        BPETokenizer(tmp_path / "missing.json")


def _config_with_tokenizer(tmp_path, tokenizer_ref: str | None):
    cfg = json.loads((CONFIG_DIR / "tiny.json").read_text())
    if tokenizer_ref is not None:
        cfg["clipforge"]["tokenizer"] = tokenizer_ref
    path = tmp_path / "tiny-bpe.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("via", ["config", "spec"])
def test_from_scratch_model_uses_the_tokenizer_and_trains_a_step(tokenizer, tmp_path, via):
    import shutil

    shutil.copy(tokenizer.path, tmp_path / "captions-bpe.json")
    if via == "config":  # relative to the config file
        spec = ModelSpec(name=str(_config_with_tokenizer(tmp_path, "captions-bpe.json")))
    else:
        spec = ModelSpec(name=str(_config_with_tokenizer(tmp_path, None)),
                         tokenizer=str(tmp_path / "captions-bpe.json"))
    bundle = create_model(spec)
    model = bundle.model.train()
    assert isinstance(bundle.tokenizer, BPETokenizer)
    assert model.token_embedding.num_embeddings == tokenizer.vocab_size != 49408
    assert model.context_length == bundle.tokenizer.context_length == 32  # the config's context length
    tokens = bundle.tokenizer(CAPTIONS[:6])
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.token_embedding.weight.detach().clone()
    loss = ClipLoss()(*model(images, tokens))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = (model.token_embedding.weight != before).any(dim=1)
    assert changed[tokens.unique()].all()


def test_tokenizer_with_a_hugging_face_tower_is_a_clear_error(tokenizer):
    with pytest.raises(ModelConfigError, match="from-scratch text transformers"):
        create_model(ModelSpec(name="miniclip-effnet-minilm", tokenizer=tokenizer.path, pretrained_towers=False))
