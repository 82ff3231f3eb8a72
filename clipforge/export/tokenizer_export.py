"""Writing a model's tokenizer as files that the `tokenizers` library alone can run.

Hugging Face tokenizers are saved with `save_pretrained` (its tokenizer.json is what runs).
open_clip's SimpleTokenizer (CLIP's byte-level BPE) is rebuilt as a `tokenizers` BPE model from its
own vocabulary and merge ranks: the caption is split by CLIP's word pattern, mapped byte-wise to
printable characters, each word's last symbol carries the `</w>` end-of-word marker, and the
start/end-of-text tokens are added around it. The vocabulary and merges are also written in the
usual vocab.json / merges.txt form. The exporter checks that the files reproduce the original token
ids on sample captions before an export is accepted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from clipforge.export.errors import ExportError
from clipforge.export.manifest import TokenizerFiles

TOKENIZER_DIR = "tokenizer"
# CLIP's word pattern without the special tokens (those are matched as added tokens first).
_CLIP_WORDS = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CleanMode = Literal["lower", "whitespace"]
_CLEAN_MODES: dict[str, CleanMode] = {"_clean_lower": "lower", "_clean_whitespace": "whitespace"}


def _clean_mode(tokenizer) -> CleanMode:
    fn = getattr(tokenizer, "clean_fn", None)
    mode = _CLEAN_MODES.get(getattr(fn, "__name__", ""))
    if mode is None:
        raise ExportError(f"tokenizer {type(tokenizer).__name__} cleans captions with "
                          f"{getattr(fn, '__name__', fn)!r}; only open_clip's 'lower' and 'whitespace' cleaning "
                          "can be exported")
    return mode


def _save_hf(tokenizer, directory: Path) -> TokenizerFiles:
    if getattr(tokenizer, "tokenizer_mode", "") or getattr(tokenizer, "strip_sep_token", False):
        raise ExportError("Hugging Face tokenizers with open_clip's `clips` mode or strip_sep_token cannot be exported")
    hf = tokenizer.tokenizer
    if not getattr(hf, "is_fast", False):
        raise ExportError(f"tokenizer {type(hf).__name__} has no fast (tokenizers) version to export")
    hf.save_pretrained(str(directory))
    if not (directory / "tokenizer.json").is_file():
        raise ExportError(f"{type(hf).__name__}.save_pretrained wrote no tokenizer.json into {directory}")
    if hf.pad_token_id is None:
        raise ExportError(f"tokenizer {type(hf).__name__} has no padding token")
    return TokenizerFiles(kind="hf", file=f"{TOKENIZER_DIR}/tokenizer.json", clean=_clean_mode(tokenizer),
                          context_length=int(tokenizer.context_length), pad_id=int(hf.pad_token_id),
                          pad_token=str(hf.pad_token))


def _save_clip_bpe(tokenizer, directory: Path) -> TokenizerFiles:
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

    if getattr(tokenizer, "reduction_fn", None) is not None:
        raise ExportError("SimpleTokenizer with a reduction mask (token dropping) cannot be exported")
    vocab = dict(tokenizer.encoder)
    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    specials = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
    sot, eot = tokenizer.decoder[tokenizer.sot_token_id], tokenizer.decoder[tokenizer.eot_token_id]

    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, tokenizer.sot_token_id), (eot, tokenizer.eot_token_id)])
    bpe.save(str(directory / "tokenizer.json"))

    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(directory / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    # open_clip pads with id 0 (not a dedicated padding token); the attention/pooling uses the end token.
    return TokenizerFiles(kind="clip_bpe", file=f"{TOKENIZER_DIR}/tokenizer.json",
                          vocab_file=f"{TOKENIZER_DIR}/merges.txt", clean=_clean_mode(tokenizer),
                          context_length=int(tokenizer.context_length), pad_id=0, pad_token=tokenizer.decoder[0])


def save_tokenizer(tokenizer, export_dir: str | Path) -> TokenizerFiles:
    """Write `tokenizer` (open_clip HFTokenizer or SimpleTokenizer) under EXPORT/tokenizer/."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    directory = Path(export_dir) / TOKENIZER_DIR
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        return _save_hf(tokenizer, directory)
    if isinstance(tokenizer, SimpleTokenizer):
        return _save_clip_bpe(tokenizer, directory)
    raise ExportError(f"tokenizer {type(tokenizer).__name__} cannot be exported; supported: open_clip's "
                      "HFTokenizer and SimpleTokenizer")
