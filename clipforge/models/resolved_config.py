"""The config a model is built from: its architecture config with the model spec's tokenizer and logit bias applied.

One function for `create_model` and for what describes a built model to other tools (the open_clip folder), so the
two never disagree.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipforge.models.errors import ModelConfigError
from clipforge.models.registry import CLIPFORGE_SECTION, load_config
from clipforge.models.spec import ModelSpec

if TYPE_CHECKING:
    from clipforge.models.tokenizer_bpe import BPETokenizer


def bpe_tokenizer(path: str, cfg: dict[str, Any], source: str) -> BPETokenizer:
    """The clipforge BPE tokenizer at `path` (relative paths in a config file are relative to that file)."""
    from clipforge.models.tokenizer_bpe import BPETokenizer

    if cfg["text_cfg"].get("hf_model_name"):
        raise ModelConfigError(
            f"tokenizer {path}: a clipforge BPE tokenizer is for from-scratch text transformers, but this model's "
            f"text tower is the Hugging Face model {cfg['text_cfg']['hf_model_name']!r}"
        )
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and not candidate.exists() and Path(source).is_file():
        candidate = Path(source).parent / candidate
    return BPETokenizer(candidate, context_length=int(cfg["text_cfg"].get("context_length", 77)))


def resolved_config(spec: ModelSpec) -> tuple[str, dict[str, Any], str, BPETokenizer | None]:
    """(model name, the config the model is built from, where it came from, the clipforge BPE tokenizer or None):
    `spec.name`'s config with the spec's tokenizer and logit bias applied."""
    name, cfg, source = load_config(spec.name)
    bpe = None
    tokenizer_path = spec.tokenizer or cfg.get(CLIPFORGE_SECTION, {}).get("tokenizer")
    if tokenizer_path:
        bpe = bpe_tokenizer(tokenizer_path, cfg, source)
        # The embedding table follows the tokenizer, whatever size the config says.
        cfg = {**cfg, "text_cfg": {**cfg["text_cfg"], "vocab_size": bpe.vocab_size}}
    if spec.init_logit_bias is not None:
        cfg = {**cfg, "init_logit_bias": spec.init_logit_bias}
    return name, cfg, source, bpe
