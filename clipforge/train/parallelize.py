"""The trained module placed on its device and wrapped for its parallelism strategy: ddp, fsdp2, or none for a
single process.

`parallelize` returns a `Wrapped`: the module to run forward through and what the wrapping itself needs --
suspending gradient synchronisation, re-wrapping when the trainable set changes between fine-tuning stages,
and gathering the full parameters. The optimizer (`optimizer.py`), the step (`train_step.py`) and the
checkpoint state (`checkpoint_state.py`) are built over a `Wrapped` by `strategy.build_strategy`.

DeepSpeed's engine wraps the module together with its optimizer, so `strategy.build_strategy` hands
`deepspeed` runs to `deepspeed_engine.py` instead.

Sharded strategies cannot hold 0-dim parameters (the temperature and logit bias): they are reshaped to
[1] while wrapped (`promote_scalars`), and the checkpoint state gives them back their own shapes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.models.regimes import tower_layout
from clipforge.train import precision
from clipforge.train.collectives import distributed
from clipforge.train.spec import TrainSpec

_SCALARS_ATTR = "_clipforge_scalar_parameters"


class Wrapped:
    """A module placed and wrapped for a strategy. The base class is a single process (no wrapper).

    `sharded`: each rank holds only parts of the parameters and their gradients (FSDP2's DTensors, ZeRO-3's
    partitions), not whole tensors of this process.
    """

    sharded = False

    def __init__(self, root: nn.Module, device: torch.device):
        self.root = root  # the unwrapped trained module
        self.device = device
        self.module: nn.Module = root  # what forward runs through

    def no_sync(self):
        """Suspends gradient synchronisation for the non-final passes of an accumulated step."""
        return contextlib.nullcontext()

    def regime_changed(self) -> None:
        """Called after `apply_regime` changed which parameters train."""

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Every parameter whole and in place on every rank (for evaluation inside training)."""
        yield


class DataParallel(Wrapped):
    """Replicated model; DDP averages gradients over ranks in backward."""

    def __init__(self, root: nn.Module, device: torch.device):
        super().__init__(root, device)
        self.module = self._wrap()

    def _wrap(self) -> nn.Module:
        if not any(p.requires_grad for p in self.root.parameters()):
            raise ValueError("ddp: the module has no trainable parameters to synchronise")
        # DDP broadcasts rank 0's parameters and buffers here, so every rank starts from the same weights.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.root, device_ids=device_ids)

    def no_sync(self):
        return self.module.no_sync()

    def regime_changed(self) -> None:
        # DDP fixes the parameters it reduces when it is built: another trainable set needs a new wrapper.
        self.module = self._wrap()


class FullyShardedParallel(Wrapped):
    """FSDP2: every tower block, then the root, sharded over the ranks (`fully_shard`).

    The optimizer must be built after wrapping: `fully_shard` replaces the parameters by DTensors, of which
    each rank updates its shard.
    """

    sharded = True

    def __init__(self, root: nn.Module, spec: TrainSpec, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        promote_scalars(root)
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        options = dict(mesh=mesh, mp_policy=precision.mixed_precision_policy(spec.precision),
                       reshard_after_forward=spec.parallel.fsdp_reshard_after_forward,
                       offload_policy=CPUOffloadPolicy(pin_memory=False) if spec.parallel.fsdp_cpu_offload
                       else OffloadPolicy())
        for block in block_modules(root):
            fully_shard(block, **options)
        fully_shard(root, **options)
        super().__init__(root, device)

    def no_sync(self):
        return _fsdp_no_sync(self.root)

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        shardeds = [m for m in self.root.modules() if isinstance(m, FSDPModule)]
        for m in shardeds:
            m.unshard()
        try:
            yield
        finally:
            for m in shardeds:
                m.reshard()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        raise TypeError(f"{type(module).__name__} is not sharded")
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def parallelize(module: nn.Module, spec: TrainSpec, device: torch.device | None = None) -> Wrapped:
    """Place `module` on `device` and wrap it as `spec.strategy` asks. A single process gets no wrapper."""
    if spec.strategy == "deepspeed":
        raise ValueError("strategy deepspeed: DeepSpeed's engine wraps the module together with its optimizer; "
                         "build it with strategy.build_strategy")
    device = device or torch.device("cpu")
    module = precision.cast_module(module.to(device), spec.precision)
    if not distributed():
        return Wrapped(module, device)
    if spec.strategy == "ddp":
        return DataParallel(module, device)
    if spec.strategy == "fsdp2":
        return FullyShardedParallel(module, spec, device)
    raise ValueError(f"strategy `{spec.strategy}` is not supported")


def unwrap(module: nn.Module | Wrapped) -> nn.Module:
    """The plain module under any strategy wrapper (for state dicts and parameter access)."""
    if isinstance(module, Wrapped):
        return module.root
    inner = getattr(module, "module", None)
    while isinstance(inner, nn.Module):  # DDP, DeepSpeed's engine
        module, inner = inner, getattr(inner, "module", None)
    return module


# ---------------------------------------------------------------------- blocks to shard


def _common_module(model: nn.Module, names: list[str]) -> nn.Module | None:
    """The deepest module holding all `names` (parameter names), below the root."""
    paths = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return model.get_submodule(".".join(common)) if common else None


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The towers' blocks (transformer layers, conv stages), deepest first, each once.

    Found through the regimes' tower layouts (the same blocks `last_blocks: N` counts); a module
    without towers has no blocks and is sharded as a whole.
    """
    blocks: list[nn.Module] = []
    for tower in ("image", "text"):
        try:
            layout = tower_layout(model, tower)
        except (AttributeError, ValueError, KeyError):
            continue
        for names in layout.blocks:
            found = _common_module(model, names) if names else None
            if found is not None and found is not model and all(found is not b for b in blocks):
                blocks.append(found)
    depth = {id(m): name.count(".") for name, m in model.named_modules()}
    return sorted(blocks, key=lambda m: -depth.get(id(m), 0))


# ---------------------------------------------------------------------- 0-dim parameters


def promote_scalars(module: nn.Module) -> list[str]:
    """Reshape 0-dim parameters to [1] (sharded strategies reject 0-dim tensors); returns their names."""
    names = []
    for name, p in module.named_parameters():
        if p.ndim == 0:
            p.data = p.data.reshape(1)
            names.append(name)
    setattr(module, _SCALARS_ATTR, getattr(module, _SCALARS_ATTR, []) + names)
    return names


def promoted_scalar_names(module: nn.Module) -> set[str]:
    """Names of the parameters `promote_scalars` reshaped from 0-dim to [1] in `module`."""
    return set(getattr(module, _SCALARS_ATTR, []))
