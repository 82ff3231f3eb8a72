"""Key mapping from EfficientNet-PyTorch (lukemelas-style) state dicts onto timm EfficientNet modules.

Ported TF checkpoints such as EfficientNet-Lite0 ship in that layout: a flat `_blocks.N` list,
`_expand_conv/_depthwise_conv/_project_conv` with `_bn0/_bn1/_bn2`, and `_conv_stem/_bn0/_conv_head/_bn1/_fc`
around them. timm groups the same blocks into stages (`blocks.S.I`) and names the parts
`conv_pw/conv_dw/conv_pwl` with `bn1/bn2/bn3`; a block without an expansion (depthwise-separable)
uses `conv_dw/bn1/conv_pw/bn2`. The mapping is derived from the timm model's own stage layout, so
it only has to agree on the number of blocks; shapes are checked by the strict load afterwards.
"""
from __future__ import annotations

import re

import torch

from clipforge.models.errors import PretrainedWeightsError

_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+\d?)\.(.+)$")
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Part names inside a block, for blocks with and without the 1x1 expansion conv.
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}


def efficientnet_pytorch_to_timm(state_dict: dict[str, torch.Tensor], timm_model: torch.nn.Module,
                                 source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename every key of an EfficientNet-PyTorch state dict to the matching key of `timm_model`."""
    stages = getattr(timm_model, "blocks", None)
    if stages is None:
        raise PretrainedWeightsError(f"{source}: the target is not a timm EfficientNet (it has no `blocks`)")
    flat = [(s, i) for s, stage in enumerate(stages) for i in range(len(stage))]
    block_ids = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if len(block_ids) != len(flat):
        raise PretrainedWeightsError(
            f"{source} has {len(block_ids)} blocks but the timm architecture has {len(flat)}: wrong model variant"
        )
    expanded = {b for b in block_ids if f"_blocks.{b}._expand_conv.weight" in state_dict}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _BLOCK_KEY.match(key)
        if m:
            block, part, rest = int(m.group(1)), m.group(2), m.group(3)
            names = _EXPANDED_BLOCK if block in expanded else _SEPARABLE_BLOCK
            if part not in names:
                raise PretrainedWeightsError(f"{source}: unknown block part in key {key!r}")
            stage, idx = flat[block]
            out[f"blocks.{stage}.{idx}.{names[part]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP_LEVEL:
            raise PretrainedWeightsError(f"{source}: unexpected key {key!r} for an EfficientNet-PyTorch state dict")
        out[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return out
