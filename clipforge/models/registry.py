"""Architecture configs: clipforge's own JSON files, a path to a JSON file, or open_clip's registry.

A config is open_clip's model-config format (`embed_dim`, `vision_cfg`, `text_cfg`, optional
CLIP constructor keys) plus an optional `clipforge` section for what open_clip's format cannot
say: where pretrained tower weights come from and how images are preprocessed.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from clipforge.models.errors import ModelConfigError
from clipforge.models.package_files import resolve_package_ref

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CLIPFORGE_SECTION = "clipforge"

# Keys of the CLIP/CustomTextCLIP constructors a config may set (the two tower configs among them).
MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "nonscalar_logit_scale", "custom_text"}
_CLIPFORGE_KEYS = {"description", "notes", "pretrained_image", "pretrained_image_format", "pretrained_text",
                   "preprocess", "tokenizer", "pretrained_hub"}
_PREPROCESS_KEYS = {"mean", "std", "interpolation", "resize_mode", "fill_color", "train_scale"}
# Config values that may be `pkg:` references, resolved at build time.
_PACKAGE_REF_FIELDS = (("text_cfg", "hf_model_name"), ("text_cfg", "hf_tokenizer_name"),
                       (CLIPFORGE_SECTION, "pretrained_image"), (CLIPFORGE_SECTION, "pretrained_text"),
                       (CLIPFORGE_SECTION, "tokenizer"))


def clipforge_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def list_models() -> list[str]:
    """clipforge's own architectures first, then every open_clip architecture name."""
    import open_clip

    ours = clipforge_config_names()
    return ours + [n for n in open_clip.list_models() if n not in ours]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelConfigError(f"cannot read model config {path}: {e}") from e
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"model config {path} is not valid JSON: {e.msg} at line {e.lineno}") from e
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"model config {path} must be a JSON object")
    return cfg


def _looks_like_path(name: str) -> bool:
    return name.endswith(".json") or "/" in name or "\\" in name


def read_config(name: str) -> tuple[str, dict[str, Any], str]:
    """(model name, config dict, where it came from) for a clipforge name, JSON path or open_clip name."""
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ModelConfigError(
            f"model {name!r}: open_clip hub/local-dir names are not supported; pass a clipforge config name, an "
            "open_clip architecture name or a .json config, and the weights as the model's checkpoint"
        )
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelConfigError(f"model config file not found: {path}")
        return path.stem, _read_json(path), str(path)
    own = CONFIG_DIR / f"{name}.json"
    if own.is_file():
        return name, _read_json(own), str(own)
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelConfigError(
            f"unknown model {name!r}: not a clipforge config ({', '.join(clipforge_config_names())}), "
            "not an open_clip architecture (see clipforge.models.list_models()) and not a path to a .json config"
        )
    return name, copy.deepcopy(cfg), f"open_clip:{name}"


def _open_clip_config_names() -> set[str]:
    """open_clip's architecture names, read from its config folder without importing it (a spec check must not
    pay for importing torch)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return set()
    if spec is None or not spec.submodule_search_locations:
        return set()
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return {p.stem for p in folder.glob("*.json")}


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot name an architecture (None when it can): the checks of `read_config` that need no import,
    so a spec is refused at validation instead of when the job builds its model."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return ("open_clip hub/local-dir names are not supported; give a clipforge config name, an open_clip "
                "architecture name or a .json config, and the weights as model.checkpoint")
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            return f"model config file {path} not found"
        return None
    if (CONFIG_DIR / f"{name}.json").is_file() or name in _open_clip_config_names():
        return None
    return (f"unknown model {name!r}: not a clipforge config ({', '.join(clipforge_config_names())}), not an "
            "open_clip architecture and not a path to a .json config")


def _check_keys(found: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise ModelConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def validate_config(cfg: dict[str, Any], source: str) -> None:
    """Reject missing or unknown fields with the config file and field named."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ModelConfigError(f"model config {source}: missing field {key!r}")
    if not isinstance(cfg["embed_dim"], int) or cfg["embed_dim"] <= 0:
        raise ModelConfigError(f"model config {source}: embed_dim must be a positive integer, got {cfg['embed_dim']!r}")
    if "multimodal_cfg" in cfg:
        raise ModelConfigError(f"model config {source}: multimodal (CoCa) models are not supported, only dual encoders")
    _check_keys(cfg, MODEL_KEYS | {CLIPFORGE_SECTION}, f"model config {source}")
    for key, dc in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        if not isinstance(cfg[key], dict):
            raise ModelConfigError(f"model config {source}: {key} must be an object")
        _check_keys(cfg[key], {f.name for f in dataclasses.fields(dc)}, f"model config {source}, {key}")
    extra = cfg.get(CLIPFORGE_SECTION, {})
    if not isinstance(extra, dict):
        raise ModelConfigError(f"model config {source}: the {CLIPFORGE_SECTION!r} section must be an object")
    _check_keys(extra, _CLIPFORGE_KEYS, f"model config {source}, {CLIPFORGE_SECTION}")
    _check_keys(extra.get("preprocess", {}), _PREPROCESS_KEYS, f"model config {source}, {CLIPFORGE_SECTION}.preprocess")
    needs = (("pretrained_text", "text_cfg", "hf_model_name", "a Hugging Face text tower"),
             ("pretrained_image", "vision_cfg", "timm_model_name", "a timm image tower"))
    for key, section, field, tower in needs:
        if key in extra and not cfg[section].get(field):
            raise ModelConfigError(
                f"model config {source}: {CLIPFORGE_SECTION}.{key} needs {tower} ({section}.{field})"
            )
    if "tokenizer" in extra and cfg["text_cfg"].get("hf_model_name"):
        raise ModelConfigError(
            f"model config {source}: {CLIPFORGE_SECTION}.tokenizer is for from-scratch text transformers; a Hugging "
            "Face text tower (text_cfg.hf_model_name) uses its own tokenizer"
        )
    if not isinstance(extra.get("pretrained_hub", False), bool):
        raise ModelConfigError(f"model config {source}: {CLIPFORGE_SECTION}.pretrained_hub must be true or false")


def resolve_package_refs(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of `cfg` with every `pkg:` reference replaced by the installed file's absolute path."""
    cfg = copy.deepcopy(cfg)
    for section, key in _PACKAGE_REF_FIELDS:
        value = cfg.get(section, {}).get(key)
        if value is not None:
            cfg[section][key] = resolve_package_ref(value, what=f"{section}.{key}")
    return cfg


def load_config(name: str) -> tuple[str, dict[str, Any], str]:
    """(model name, validated config with package references resolved, where it came from)."""
    model_name, cfg, source = read_config(name)
    validate_config(cfg, source)
    return model_name, resolve_package_refs(cfg), source
