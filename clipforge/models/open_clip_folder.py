"""A checkpoint directory that plain open_clip loads: `open_clip.create_model_and_transforms('local-dir:PATH')`.

open_clip's local-dir convention: PATH/open_clip_config.json holds `model_cfg` (passed as they are to open_clip's
CLIP / CustomTextCLIP constructor) and `preprocess_cfg` (its image transform); the weights are the first
`*.safetensors`, `*.bin` or `*.pth` file it finds in PATH (open_clip_pytorch_model.bin is its preferred name), and
a Hugging Face text tower's tokenizer is read from PATH itself. What clipforge adds for that:

  open_clip_config.json          `model_cfg`: the architecture config without its clipforge section, the
                                 tokenizer's vocabulary size and the logit bias applied as `create_model` applies
                                 them, towers named so that open_clip can build them (below); `preprocess_cfg`:
                                 clipforge's real image transform (size, mean, std, interpolation, resize mode, fill);
                                 `clipforge`: what only clipforge reads (the model spec, the config's own section),
                                 a top-level key open_clip ignores
  open_clip_pytorch_model.bin    the weights: a hard link to model.pt where the filesystem has them (no second
                                 copy on disk), else a copy (server-side on object stores)
  config.json, tokenizer files   with a Hugging Face text tower only: that tower's config and tokenizer

Towers. A timm image tower is built by its timm name without pretrained weights (the weights file holds them),
so `pkg:` / local tower weight files are not needed. A Hugging Face text tower is built from a config that
`transformers` can load: open_clip passes `text_cfg.hf_model_name` to it as given and resolves a relative path
against the working directory, not the folder, so a tower that is not on the model hub (a `pkg:` reference or a
local directory) is named by the folder's own absolute path, where its config.json is written. Such a folder
loads where it was written; after moving it, set `text_cfg.hf_model_name` to its new path (a tower named by hub
name, e.g. roberta-base, keeps that name and loads anywhere the hub or its cache is). A clipforge BPE tokenizer
(`model.tokenizer`) is copied into the folder, but open_clip's get_tokenizer cannot use it (it builds open_clip's
CLIP tokenizer for a built-in text transformer): tokenize with `clipforge.models.BPETokenizer(PATH/tokenizer.json)`.

The files are written beside the checkpoint's own files, before meta.json, and are not part of the checkpoint's
records: clipforge never reads them, so loading a checkpoint, resuming and pruning are unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clipforge.models.registry import CLIPFORGE_SECTION, MODEL_KEYS, read_config
from clipforge.models.spec import ModelSpec

log = logging.getLogger(__name__)

# Names open_clip's local-dir loader looks for (open_clip.constants.HF_CONFIG_NAME / HF_WEIGHTS_NAME).
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_pytorch_model.bin"
BPE_TOKENIZER_FILE = "tokenizer.json"


def _is_local_dir(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def preprocess_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's PreprocessCfg fields for clipforge's eval transform of `cfg` (every field written out, so
    open_clip's defaults, OpenAI's mean and std among them, never stand in for clipforge's)."""
    from open_clip.model import CLIPVisionCfg
    from open_clip.transform import PreprocessCfg

    pre = dict(cfg.get(CLIPFORGE_SECTION, {}).get("preprocess", {}))
    pre.pop("train_scale", None)  # a training augmentation, not part of the eval transform
    # The tower's input size, as create_model's transform takes it (open_clip sets it from the tower too).
    size = cfg["vision_cfg"].get("image_size", CLIPVisionCfg.image_size)
    fields = dataclasses.asdict(PreprocessCfg(size=size, **pre))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _open_clip_model_cfg(cfg: dict[str, Any], folder: str) -> dict[str, Any]:
    """The CLIP constructor arguments of `cfg`, with towers open_clip can build from `folder`."""
    model_cfg = json.loads(json.dumps({k: v for k, v in cfg.items() if k in MODEL_KEYS}))
    vision = model_cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False  # the weights file holds the trunk
    text = model_cfg["text_cfg"]
    hf_name = text.get("hf_model_name")
    if hf_name:
        text["hf_model_pretrained"] = False
        if _is_local_dir(hf_name):
            text["hf_model_name"] = folder  # its config.json is written there
        # open_clip reads a local-dir model's HF tokenizer from the folder whatever this names, but only when it is
        # set; a local directory is named as the folder that now holds its files.
        tokenizer = text.get("hf_tokenizer_name") or hf_name
        text["hf_tokenizer_name"] = folder if _is_local_dir(tokenizer) else tokenizer
    return model_cfg


def open_clip_config(spec: ModelSpec, cfg: dict[str, Any], folder: str) -> dict[str, Any]:
    """open_clip_config.json's contents for a model `create_model(spec)` built from the config `cfg`, written into
    `folder` (its absolute path or URL)."""
    # The config's own clipforge section as written (`pkg:` references unresolved: they hold on any machine).
    section = read_config(spec.name)[1].get(CLIPFORGE_SECTION, {})
    return {
        "model_cfg": _open_clip_model_cfg(cfg, folder),
        "preprocess_cfg": preprocess_cfg(cfg),
        CLIPFORGE_SECTION: {"model": spec.model_dump(mode="json"), "config": section},
    }


def _hf_files(text_cfg: dict[str, Any], into: Path) -> None:
    """The Hugging Face text tower's config.json and tokenizer files, as `transformers` saves them."""
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(text_cfg["hf_model_name"]).save_pretrained(into)
    tokenizer_name = text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"]
    AutoTokenizer.from_pretrained(tokenizer_name).save_pretrained(into)


def _link_or_copy_weights(fs: fsspec.AbstractFileSystem, model_path: str, weights_path: str) -> None:
    if fs.exists(weights_path):
        fs.rm(weights_path)
    if isinstance(fs, LocalFileSystem):
        try:
            os.link(model_path, weights_path)
            return
        except OSError:
            pass  # a filesystem without hard links: copy below
    fs.copy(model_path, weights_path)


def _upload(fs: fsspec.AbstractFileSystem, local_dir: Path, root: str) -> None:
    for path in sorted(local_dir.iterdir()):
        fs.put_file(str(path), f"{root}/{path.name}")


def write_open_clip_files(fs: fsspec.AbstractFileSystem, root: str, model_file: str, spec: ModelSpec) -> None:
    """Make the checkpoint directory `root` (on `fs`, its weights in `model_file`) an open_clip local-dir folder
    for the model `spec` describes."""
    from clipforge.models.resolved_config import resolved_config

    _, cfg, _, bpe = resolved_config(spec)
    folder = os.path.abspath(root) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(root)
    config = open_clip_config(spec, cfg, folder)
    with tempfile.TemporaryDirectory(prefix="clipforge-open-clip-") as tmp:
        staged = Path(tmp)
        if cfg["text_cfg"].get("hf_model_name"):
            _hf_files(cfg["text_cfg"], staged)
        if bpe is not None:
            shutil.copyfile(bpe.path, staged / BPE_TOKENIZER_FILE)
        (staged / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _upload(fs, staged, root)
    _link_or_copy_weights(fs, f"{root}/{model_file}", f"{root}/{OPEN_CLIP_WEIGHTS_FILE}")


def model_spec_of(meta: dict[str, Any]) -> ModelSpec | None:
    """The model section of the spec a checkpoint's meta carries (a training run's do), or None."""
    section = (meta.get("spec") or {}).get("model") if isinstance(meta.get("spec"), dict) else None
    if not isinstance(section, dict):
        return None
    try:
        return ModelSpec.model_validate(section)
    except ValueError:
        return None


def try_write_open_clip_files(fs: fsspec.AbstractFileSystem, root: str, model_file: str, spec: ModelSpec) -> bool:
    """write_open_clip_files, logging instead of raising: the files serve open_clip users, and a checkpoint that
    resumes training must not be lost to them (a config whose tokenizer is not reachable from this process, a
    filesystem without links or copies). Returns whether they were written."""
    try:
        write_open_clip_files(fs, root, model_file, spec)
        return True
    except Exception as e:  # noqa: BLE001 - any failure here leaves a checkpoint that clipforge loads as before
        log.warning("checkpoint %s: not written as an open_clip folder (%s: %s); clipforge loads it as usual",
                    root, type(e).__name__, e)
        return False
