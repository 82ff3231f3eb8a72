"""A byte-level BPE tokenizer trained on a caption corpus, for from-scratch text towers.

Captions are normalised (Unicode NFC, lower case, runs of white space to one space, trimmed) and
split into byte-level BPE pieces, so any text encodes without unknown tokens and decodes back to its
normalised form. Token ids follow open_clip's conventions for its text transformer: 0 pads, every
sequence is <start_of_text> ... <end_of_text>, and <end_of_text> has the highest id in the vocabulary,
which is what the transformer's default (argmax) pooling looks for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from clipforge.models.errors import ModelConfigError

PAD, START, END = "<pad>", "<start_of_text>", "<end_of_text>"


def _normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ])


def normalize_caption(text: str) -> str:
    """The text a caption decodes back to: what the tokenizer's normaliser makes of it."""
    return _normalizer().normalize_str(text)


def _read_corpus(corpus: str | Path | Iterable[str], column: str) -> Iterator[str]:
    """Captions from a list of strings, a text file (one caption per line) or a parquet file (`column`)."""
    if not isinstance(corpus, (str, Path)):
        yield from (str(c) for c in corpus)
        return
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"caption corpus not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if column not in names:
            raise ValueError(f"caption corpus {path}: no column {column!r} (columns: {', '.join(names)})")
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=8192):
            yield from (c for c in batch.column(0).to_pylist() if c)
        return
    with path.open(encoding="utf-8") as f:
        yield from (line.rstrip("\n") for line in f)


def train_bpe_tokenizer(corpus: str | Path | Iterable[str], out_path: str | Path, vocab_size: int = 8192,
                        min_frequency: int = 2, column: str = "caption",
                        context_length: int = 77) -> "BPETokenizer":
    """Train on `corpus` (captions, a .txt file or a .parquet file's `column`), save to `out_path` (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be at least 260 (256 byte symbols, 3 special tokens), got {vocab_size}")
    captions = [c for c in (normalize_caption(t) for t in _read_corpus(corpus, column)) if c]
    if not captions:
        raise ValueError(f"caption corpus {corpus if isinstance(corpus, (str, Path)) else '(list)'} has no text")
    tok = Tokenizer(models.BPE())
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=min_frequency,
        special_tokens=[PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer, length=len(captions))
    # Added after training, so they take the two highest ids (the end token last).
    tok.add_special_tokens([START, END])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return BPETokenizer(out_path, context_length=context_length)


class BPETokenizer:
    """Callable like open_clip's tokenizers: list of captions -> LongTensor [n, context_length]."""

    def __init__(self, path: str | Path, context_length: int = 77):
        from tokenizers import Tokenizer

        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
        path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # a missing or foreign file must name itself
            reason = "file not found" if not path.is_file() else f"{type(e).__name__}: {e}"
            raise ModelConfigError(f"cannot load tokenizer {path}: {reason}") from e
        pad_id, start_id, end_id = (self._tok.token_to_id(t) for t in (PAD, START, END))
        if pad_id is None or start_id is None or end_id is None:
            raise ModelConfigError(f"tokenizer {path} was not made by clipforge (no {PAD}/{START}/{END} tokens)")
        self.pad_id, self.start_id, self.end_id = pad_id, start_id, end_id
        self.path = str(path)
        self.context_length = context_length
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, without start/end tokens or truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.start_id, self.end_id)]
        return self._tok.decode(ids, skip_special_tokens=False)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            # Long captions are cut, but still end with the end token the text tower pools at.
            ids = [self.start_id, *enc.ids[:length - 2], self.end_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
