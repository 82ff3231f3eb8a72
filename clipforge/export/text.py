"""Caption tokenization for exported models with the `tokenizers` library only (no PyTorch, no transformers).

open_clip cleans every caption in Python before tokenizing (ftfy, HTML entities, whitespace, and
for its own BPE lower case); the same cleaning runs here, then the exported tokenizer.json with
truncation and padding to the model's context length.
"""
from __future__ import annotations

import html
import unicodedata
from pathlib import Path

import numpy as np

from clipforge.export.errors import ExportError
from clipforge.export.manifest import TokenizerFiles


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        # ftfy repairs mojibake; without it, canonical composition is the part of its work that matters
        # for well-formed input.
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def clean_text(text: str, mode: str) -> str:
    """open_clip's caption cleaning: `whitespace` (fix text, unescape HTML twice, collapse whitespace) or
    `lower` (the same, lower-cased)."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


class CaptionTokenizer:
    """Captions -> int64 [N, context_length] token ids, as the exported model's tokenizer makes them."""

    def __init__(self, cfg: TokenizerFiles, root: str | Path):
        from tokenizers import Tokenizer

        path = Path(root) / cfg.file
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception subclasses for bad files
            raise ExportError(f"cannot load tokenizer {path}: {e}") from None
        # The file may carry its own truncation/padding settings (e.g. 128/longest for BERT); the model's
        # context length decides.
        tok.enable_truncation(max_length=cfg.context_length)
        tok.enable_padding(length=cfg.context_length, pad_id=cfg.pad_id, pad_token=cfg.pad_token)
        self._tok = tok
        self.cfg = cfg

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ExportError("no captions to tokenize")
        cleaned = [clean_text(t, self.cfg.clean) for t in texts]
        encodings = self._tok.encode_batch(cleaned)
        return np.asarray([e.ids for e in encodings], dtype=np.int64)
