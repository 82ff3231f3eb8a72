"""Loading pretrained tower weights (named in a config's `clipforge` section) into freshly built towers.

Every load is strict: a key the tower has but the file lacks, a key the file has but the tower
does not use, or a shape mismatch is an error naming the file. The only keys allowed to go unused
are the ones the architecture deliberately drops (an ImageNet classifier, a BERT pooler).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipforge.models.effnet_ported import efficientnet_pytorch_to_timm
from clipforge.models.errors import PretrainedWeightsError

IMAGE_WEIGHT_FORMATS = ("timm", "efficientnet_pytorch")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a local .safetensors/.pt/.pth/.bin file (a `state_dict` entry is unwrapped)."""
    sd: Any  # whatever the file holds, checked below
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PretrainedWeightsError(f"pretrained weights file not found: {path}") from None
    except Exception as e:  # any decoding failure means the file is not a state dict
        raise PretrainedWeightsError(f"cannot read pretrained weights {path}: {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedWeightsError(f"{path} is not a state dict (a mapping of names to tensors)")
    return sd


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                droppable_prefixes: tuple[str, ...] = (), error: type[Exception] = PretrainedWeightsError) -> None:
    """load_state_dict(strict=True) raising `error` that lists what does not fit, naming `source`.

    Keys under `droppable_prefixes` that the module does not have are discarded first.
    """
    own = module.state_dict()
    sd = {k: v for k, v in state_dict.items() if k in own or not k.startswith(droppable_prefixes)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        problems = [f"{name}: {show(items)}" for name, items in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items]
        raise error(f"weights in {source} do not fit the architecture; " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)


def load_image_tower(visual: torch.nn.Module, path: str, fmt: str) -> None:
    """Load an ImageNet-style trunk file into an open_clip TimmModel's `trunk` (its classifier is dropped)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise PretrainedWeightsError(
            f"pretrained_image {path}: only timm image towers (vision_cfg.timm_model_name) take separate weights"
        )
    if fmt not in IMAGE_WEIGHT_FORMATS:
        raise PretrainedWeightsError(
            f"pretrained_image_format {fmt!r} is not one of {', '.join(IMAGE_WEIGHT_FORMATS)}"
        )
    sd = read_state_dict(path)
    if fmt == "efficientnet_pytorch":
        sd = efficientnet_pytorch_to_timm(sd, trunk, source=path)
    classifier = trunk.default_cfg.get("classifier", "classifier") if hasattr(trunk, "default_cfg") else "classifier"
    load_strict(trunk, sd, path, droppable_prefixes=(f"{classifier}.",))


def hf_weights_file(model_dir: str) -> str:
    for name in _HF_WEIGHT_FILES:
        if (Path(model_dir) / name).is_file():
            return str(Path(model_dir) / name)
    raise PretrainedWeightsError(
        f"pretrained_text {model_dir}: no {' or '.join(_HF_WEIGHT_FILES)} in that directory"
    )


def load_text_tower(text: torch.nn.Module, model_dir: str) -> None:
    """Load a Hugging Face model directory's weights into an open_clip HFTextEncoder's `transformer`.

    The BERT pooler is unused with mean pooling, and `position_ids` is a constant buffer that
    recent transformers versions no longer store.
    """
    transformer = getattr(text, "transformer", None)
    if transformer is None or not hasattr(text, "pooler"):
        raise PretrainedWeightsError(
            f"pretrained_text {model_dir}: only Hugging Face text towers (text_cfg.hf_model_name) take separate weights"
        )
    path = hf_weights_file(model_dir)
    sd = read_state_dict(path)
    load_strict(transformer, sd, path, droppable_prefixes=("pooler.", "embeddings.position_ids"))
