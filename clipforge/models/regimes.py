"""Fine-tuning regimes as data: which parameters of each tower train, and how that changes over a run.

A regime (ModelSpec.trainable) is `all`, `heads`, per tower {image: ..., text: ...} with `all`, `head`
or {last_blocks: N}, or a list of stages that switch between those by step or epoch. Each tower is seen
as stem -> blocks -> tail -> head: `last_blocks: N` trains the last N blocks, the tail (final norms,
pooling) and the head, and freezes the stem and earlier blocks. The temperature and logit bias always
train.

Frozen parameters get requires_grad=False and lose any gradient they held, so no optimizer moves them
(AdamW skips parameters without a gradient, weight decay included). Normalisation layers with running
statistics inside frozen parts are held in eval mode so that their statistics do not drift either.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from clipforge.models.errors import ModelConfigError
from clipforge.models.spec import TowerBlocks, Trainable
from clipforge.models.towers import OpenClipModel, _image_kind, _text_kind, unwrap

_FROZEN_FLAG = "_clipforge_frozen"
_HOOKED_FLAG = "_clipforge_regime_hook"


@dataclass
class TowerLayout:
    """Parameter names of one tower in forward order: stem, blocks (one list per block), tail, head."""

    stem: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return self.stem + [n for b in self.blocks for n in b] + self.tail + self.head


def _names_under(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]


def _timm_layout(model: OpenClipModel) -> TowerLayout:
    """timm trunks name their own stem and blocks (the grouping timm uses for layer-wise learning rates)."""
    from timm.models import group_parameters

    trunk = model.visual.trunk
    if not hasattr(trunk, "group_matcher"):
        raise ModelConfigError(f"timm model {type(trunk).__name__} does not describe its blocks; use `all` or `head`")
    groups = list(group_parameters(trunk, trunk.group_matcher(coarse=False)).values())
    names = [[f"visual.trunk.{n}" for n in g] for g in groups]
    # timm merges what follows the last block (final norm, conv head) into that block's group.
    return TowerLayout(stem=names[0], blocks=names[1:], head=_names_under(model, "visual.head"))


def _vit_layout(model: OpenClipModel) -> TowerLayout:
    visual = model.visual
    n_blocks = len(visual.transformer.resblocks)
    blocks = [_names_under(model, f"visual.transformer.resblocks.{i}") for i in range(n_blocks)]
    in_blocks = {n for b in blocks for n in b}
    stem_parts = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout")
    stem: list[str] = []
    tail: list[str] = []
    for name in _names_under(model, "visual"):
        if name in in_blocks or name == "visual.proj":
            continue
        (stem if name.split(".")[1] in stem_parts else tail).append(name)
    return TowerLayout(stem=stem, blocks=blocks, tail=tail, head=["visual.proj"])


def _largest_module_list(module: nn.Module) -> tuple[str, nn.ModuleList]:
    lists = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ModelConfigError(f"text tower {type(module).__name__} has no list of layers to count blocks in")
    return max(lists, key=lambda item: len(item[1]))


def _hf_layout(model: OpenClipModel) -> TowerLayout:
    list_name, layers = _largest_module_list(model.text.transformer)
    prefix = f"text.transformer.{list_name}"
    blocks = [_names_under(model, f"{prefix}.{i}") for i in range(len(layers))]
    in_blocks = {n for b in blocks for n in b}
    stem: list[str] = []
    tail: list[str] = []
    for name in _names_under(model, "text.transformer"):
        if name not in in_blocks:
            (stem if ".embeddings." in name or name.startswith("text.transformer.embeddings") else tail).append(name)
    head = [n for n in _names_under(model, "text") if not n.startswith("text.transformer.")]
    return TowerLayout(stem=stem, blocks=blocks, tail=tail, head=head)


def _clip_text_layout(model: OpenClipModel) -> TowerLayout:
    blocks = [_names_under(model, f"transformer.resblocks.{i}") for i in range(len(model.transformer.resblocks))]
    stem = _names_under(model, "token_embedding") + _names_under(model, "positional_embedding")
    return TowerLayout(stem=stem, blocks=blocks, tail=_names_under(model, "ln_final"),
                       head=_names_under(model, "text_projection"))


def tower_layout(model: nn.Module, tower: str) -> TowerLayout:
    """The stem/blocks/tail/head split of the `image` or `text` tower's parameters."""
    model = unwrap(model)
    if tower == "image":
        return _timm_layout(model) if _image_kind(model) == "timm" else _vit_layout(model)
    if tower == "text":
        return _hf_layout(model) if _text_kind(model) == "hf" else _clip_text_layout(model)
    raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")


def _tower_trainable(layout: TowerLayout, rule, tower: str) -> list[str]:
    if rule == "all":
        return layout.all()
    if rule == "head":
        return list(layout.head)
    if isinstance(rule, TowerBlocks):
        n = rule.last_blocks
        if n > len(layout.blocks):
            raise ModelConfigError(
                f"trainable.{tower}.last_blocks is {n}, but the {tower} tower has only {len(layout.blocks)} blocks"
            )
        if n == 0:
            return list(layout.head)
        return [name for block in layout.blocks[-n:] for name in block] + layout.tail + layout.head
    raise ValueError(f"unknown {tower} tower rule {rule!r}")


def parse_trainable(trainable) -> "Trainable":
    """`trainable` as ModelSpec holds it (plain dicts and lists from YAML/JSON are validated here)."""
    from pydantic import TypeAdapter

    from clipforge.models.spec import _check_stages

    parsed = TypeAdapter(Trainable).validate_python(trainable)
    if isinstance(parsed, list):
        _check_stages(parsed)
    return parsed


def stage_at(trainable, step: int = 0, epoch: int = 0):
    """The regime in force at optimizer `step` (0-based) during epoch `epoch` (0-based)."""
    trainable = parse_trainable(trainable)
    if not isinstance(trainable, list):
        return trainable
    for stage in trainable:
        if stage.until_step is not None and step < stage.until_step:
            return stage.trainable
        if stage.until_epoch is not None and epoch < stage.until_epoch:
            return stage.trainable
        if stage.until_step is None and stage.until_epoch is None:
            return stage.trainable
    # Past the last stage's end: its regime stays.
    return trainable[-1].trainable


def trainable_names(model: nn.Module, trainable, step: int = 0, epoch: int = 0) -> list[str]:
    """Names of the parameters that train under `trainable` (at `step`/`epoch` for a schedule), in model order."""
    model = unwrap(model)
    regime = stage_at(trainable, step, epoch)
    always = {"logit_scale", "logit_bias"}
    if regime == "all":
        keep = {n for n, _ in model.named_parameters()}
    elif regime == "heads":
        keep = set(tower_layout(model, "image").head) | set(tower_layout(model, "text").head) | always
    else:
        keep = set(always)
        for tower in ("image", "text"):
            keep.update(_tower_trainable(tower_layout(model, tower), getattr(regime, tower), tower))
    return [n for n, _ in model.named_parameters() if n in keep]


def schedule_parameter_names(model: nn.Module, trainable) -> list[str]:
    """Every parameter that trains in some stage: what an optimizer for the whole schedule must hold."""
    trainable = parse_trainable(trainable)
    regimes = [s.trainable for s in trainable] if isinstance(trainable, list) else [trainable]
    union: set[str] = set()
    for regime in regimes:
        union.update(trainable_names(model, regime))
    return [n for n, _ in unwrap(model).named_parameters() if n in union]


def _eval_if_frozen(module: nn.Module, args: tuple) -> None:
    if getattr(module, _FROZEN_FLAG, False) and module.training:
        nn.Module.train(module, False)


def _has_running_stats(module: nn.Module) -> bool:
    return getattr(module, "track_running_stats", False) and getattr(module, "running_mean", None) is not None


def apply_regime(model: nn.Module, trainable, step: int = 0, epoch: int = 0) -> list[str]:
    """Set requires_grad by `trainable` (its stage at `step`/`epoch`) and return the trainable parameter names.

    Can be called again at every stage change; parameters frozen by a later stage lose their gradients.
    """
    model = unwrap(model)
    names = trainable_names(model, trainable, step, epoch)
    keep = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        if name not in keep:
            p.grad = None
    for module in model.modules():
        if not _has_running_stats(module):
            continue
        own = list(module.parameters(recurse=False))
        frozen = bool(own) and not any(p.requires_grad for p in own)
        setattr(module, _FROZEN_FLAG, frozen)
        if frozen and not getattr(module, _HOOKED_FLAG, False):
            # A plain module-level function, so the model still pickles and deep-copies.
            module.register_forward_pre_hook(_eval_if_frozen)
            setattr(module, _HOOKED_FLAG, True)
        if frozen:
            nn.Module.train(module, False)
    return names

