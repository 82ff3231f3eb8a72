"""The one place where the trained module is placed on its device and wrapped for the parallelism strategy.

`parallelize` returns a `Parallel`: the module to run forward through, its optimizer, and everything a
step does that depends on the strategy (backward, clipping and the gradient norm, the optimizer step,
the temperature clamp, the gradient scaler) plus the strategy-independent checkpoint format:

  model:     the unwrapped model's full state dict, fp32 (frozen towers included);
  optimizer: torch.optim's own state-dict layout (parameters numbered in the optimizer's order, that is
             decayed weights first, then the rest, each in model order), with full, unsharded tensors.

So a checkpoint written under one strategy resumes under any other. `full_state_dicts` is a collective
(every rank calls it; rank 0 receives the dicts), `load_optimizer_state` runs on every rank with the
full dict each rank read from the checkpoint.

Sharded strategies cannot hold 0-dim parameters (the temperature and logit bias): they are reshaped to
[1] while wrapped, and the state dicts give them back their own shapes.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.models.regimes import tower_layout
from clipforge.train import precision
from clipforge.train.collectives import distributed
from clipforge.train.optimizer import build_optimizer
from clipforge.train.spec import TrainSpec

_SCALARS_ATTR = "_clipforge_scalar_parameters"


class Parallel:
    """A module wrapped for a strategy, with its optimizer. The base class is a single process (no wrapper).

    `fused_adamw`: run AdamW on torch's fused kernel (see `build_optimizer`); only for parameters that are plain
    tensors of this process (not FSDP2's DTensors, nor an optimizer that DeepSpeed wraps).
    """

    def __init__(self, module: nn.Module, spec: TrainSpec, device: torch.device, names: list[str] | None,
                 fused_adamw: bool = False):
        self.root = module  # the unwrapped trained module
        self.spec = spec
        self.device = device
        self.optimizer = build_optimizer(module, spec.optim, names, fused=fused_adamw)
        self.scaler = precision.grad_scaler(spec.precision, device)
        self.module: nn.Module = module  # what forward runs through

    # ------------------------------------------------------------------ one step

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The module's outputs in fp32 (the loss runs in fp32 under every precision)."""
        inputs = precision.cast_inputs(inputs, self.spec.precision)
        with precision.autocast(self.spec.precision, self.device):
            outputs = self.module(*inputs)
        return tuple(o.float() for o in outputs)

    def no_sync(self):
        """Suspends gradient synchronisation for the non-final passes of an accumulated step."""
        return contextlib.nullcontext()

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.root.parameters() if p.requires_grad]

    def step(self, max_norm: float | None) -> float | None:
        """Unscale, clip to `max_norm`, step; returns the global gradient norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.trainable() if p.grad is not None]
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        return _as_float(norm)

    def drop(self) -> None:
        """Discard this step's gradients (a non-finite loss): no parameter moves."""
        self.zero_grad()

    def needs_backward_to_drop(self) -> bool:
        """Whether a dropped step still runs backward (wrappers that expect every forward to have one)."""
        return True

    def clamp_logit_scale(self, max_scale: float) -> None:
        """Keep exp(logit_scale) within [1, max_scale], as CLIP does after each step."""
        with torch.no_grad():
            self.root.logit_scale.clamp_(0, math.log(max_scale))

    def logit_scale(self) -> float:
        return float(self.root.logit_scale.detach().float().exp().reshape(-1)[0])

    def regime_changed(self) -> None:
        """Called after `apply_regime` changed which parameters train."""

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Every parameter whole and in place on every rank (for evaluation inside training)."""
        yield

    # ------------------------------------------------------------------ checkpoint format

    def full_state_dicts(self, model: nn.Module) -> tuple[dict | None, dict | None]:
        """(model state, optimizer state) in the common full format on rank 0, (None, None) elsewhere."""
        if _rank() != 0:
            return None, None
        return _fp32(_restore_scalar_shapes(model, model.state_dict())), self._optimizer_state_dict()

    def _optimizer_state_dict(self) -> dict:
        return _scalar_states_as(self.root, self.param_names(), self.optimizer.state_dict(), ())

    def load_optimizer_state(self, state: dict) -> None:
        state = _with_kernel_flags_of(self.optimizer, state)
        self.optimizer.load_state_dict(_scalar_states_as(self.root, self.param_names(), state, (1,)))

    def param_names(self) -> list[str]:
        """Names of the optimizer's parameters in its own order (the numbering of its state dict)."""
        names = {p: n for n, p in self.root.named_parameters()}
        return [names[p] for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def optimizer_state(self) -> "_OptimizerState":
        """What checkpoints.restore_training_state loads the optimizer state into."""
        return _OptimizerState(self)


class _OptimizerState:
    """load_state_dict(full state) -> Parallel.load_optimizer_state, for the checkpoint reader."""

    def __init__(self, parallel: Parallel):
        self.parallel = parallel

    def load_state_dict(self, state: dict) -> None:
        self.parallel.load_optimizer_state(state)


class Held:
    """A state dict already gathered, handed to the checkpoint writer (which calls `.state_dict()`)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class DataParallel(Parallel):
    """Replicated model; DDP averages gradients over ranks in backward."""

    def __init__(self, module, spec, device, names):
        super().__init__(module, spec, device, names, fused_adamw=True)
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


class FullyShardedParallel(Parallel):
    """FSDP2: every tower block, then the root, sharded over the ranks (`fully_shard`)."""

    def __init__(self, module, spec, device, names):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        promote_scalars(module)
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        options = dict(mesh=mesh, mp_policy=precision.mixed_precision_policy(spec.precision),
                       reshard_after_forward=spec.parallel.fsdp_reshard_after_forward,
                       offload_policy=CPUOffloadPolicy(pin_memory=False) if spec.parallel.fsdp_cpu_offload
                       else OffloadPolicy())
        for block in block_modules(module):
            fully_shard(block, **options)
        fully_shard(module, **options)
        # The optimizer is built over the sharded parameters (DTensors): each rank updates its shard.
        super().__init__(module, spec, device, names)
        if self.scaler is not None:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            # Each rank sees only its gradient shards: overflow must be agreed on by all ranks.
            self.scaler = ShardedGradScaler(device.type, init_scale=spec.precision.init_scale)

    def no_sync(self):
        return _fsdp_no_sync(self.root)

    def logit_scale(self) -> float:
        # A one-element DTensor, held by one rank (clamping it in place clamps that shard).
        value = self.root.logit_scale.detach()
        return float(value.full_tensor().float().exp().reshape(-1)[0])

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

    def full_state_dicts(self, model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if model is not self.root:
            raise ValueError("fsdp2 trains the whole model: the checkpointed model must be the wrapped one")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, self.optimizer, options=options)
        if _rank() != 0:
            return None, None
        names = self.param_names()
        numbered = _numbered_optimizer_state(optim_state, names)
        return _fp32(_restore_scalar_shapes(model, model_state)), _scalar_states_as(model, names, numbered, ())

    def load_optimizer_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self.param_names()
        state = _scalar_states_as(self.root, names, _with_kernel_flags_of(self.optimizer, state), (1,))
        if not state.get("state"):
            return  # written before any update: the fresh optimizer is that state
        by_name = _named_optimizer_state(state, names)
        set_optimizer_state_dict(self.root, self.optimizer, by_name, options=StateDictOptions(full_state_dict=True))


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


def parallelize(module: nn.Module, spec: TrainSpec, device: torch.device | None = None,
                names: list[str] | None = None) -> Parallel:
    """Place `module` on `device`, wrap it as `spec.strategy` asks and build its optimizer over `names`
    (default: the parameters that require grad). A single process gets no wrapper."""
    device = device or torch.device("cpu")
    module = module.to(device)
    if spec.strategy == "deepspeed":
        from clipforge.train.deepspeed_engine import DeepSpeedParallel

        # DeepSpeed casts the module itself (its bf16 mode) and needs its process group even for one rank.
        return DeepSpeedParallel(module, spec, device, names)
    module = precision.cast_module(module, spec.precision)
    if not distributed():
        return Parallel(module, spec, device, names, fused_adamw=True)
    if spec.strategy == "ddp":
        return DataParallel(module, spec, device, names)
    if spec.strategy == "fsdp2":
        return FullyShardedParallel(module, spec, device, names)
    raise ValueError(f"strategy `{spec.strategy}` is not supported")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under any strategy wrapper (for state dicts and parameter access)."""
    if isinstance(module, Parallel):
        return module.root
    while isinstance(getattr(module, "module", None), nn.Module):  # DDP, DeepSpeed's engine
        module = module.module
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


def _scalar_names(module: nn.Module) -> set[str]:
    return set(getattr(module, _SCALARS_ATTR, []))


def _restore_scalar_shapes(module: nn.Module, state: dict) -> dict:
    scalars = _scalar_names(module)
    return {k: v.reshape(()) if k in scalars and isinstance(v, torch.Tensor) and v.numel() == 1 else v
            for k, v in state.items()}


def _scalar_states_as(module: nn.Module, names: list[str], state: dict, shape: tuple) -> dict:
    """Optimizer state (numbered by `names`) with the moments of 0-dim parameters reshaped to `shape`."""
    scalars = _scalar_names(module)
    if not scalars or not state.get("state"):
        return state
    out = {**state, "state": dict(state["state"])}
    for index, per_param in state["state"].items():
        if names[int(index)] in scalars:
            out["state"][index] = {k: v.reshape(shape) if k != "step" and isinstance(v, torch.Tensor) else v
                                   for k, v in per_param.items()}
    return out


# ---------------------------------------------------------------------- the optimizer's kernel

# Which implementation torch.optim runs; saved in every param group, but a property of this run, not of the state.
_KERNEL_FLAGS = ("fused", "foreach")


def _with_kernel_flags_of(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """`state` with `optimizer`'s own kernel flags in its param groups (torch's load_state_dict takes the saved
    groups' flags), so a checkpoint resumes on this run's kernel whichever kernel or strategy wrote it."""
    saved = state.get("param_groups") or []
    if len(saved) != len(optimizer.param_groups):
        return state  # torch's load_state_dict names the mismatch
    groups = [{**g, **{k: mine[k] for k in _KERNEL_FLAGS if k in mine}}
              for g, mine in zip(saved, optimizer.param_groups)]
    return {**state, "param_groups": groups}


# ---------------------------------------------------------------------- optimizer state layouts


def _numbered_optimizer_state(by_name: dict, names: list[str]) -> dict:
    """torch.distributed's name-keyed optimizer state -> torch.optim's layout, numbered as `names` are ordered."""
    numbers = {name: i for i, name in enumerate(names)}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [numbers[n] for n in group["params"]]}
              for group in by_name["param_groups"]]
    return {"state": {numbers[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}


def _named_optimizer_state(numbered: dict, names: list[str]) -> dict:
    """torch.optim's numbered layout -> name-keyed, numbering by the current optimizer's order."""
    groups, index = [], 0
    for group in numbered["param_groups"]:
        n = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": names[index:index + n]})
        index += n
    if index != len(names):
        raise ValueError(f"the checkpoint's optimizer holds {index} parameters, this run's {len(names)}; "
                         "model.trainable must list the same parameters as when it was written")
    return {"state": {names[int(i)]: v for i, v in numbered["state"].items()}, "param_groups": groups}


# ---------------------------------------------------------------------- small helpers


def _rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def _as_float(value: Any) -> float | None:
    """A gradient norm as a number; None when it overflowed (fp16 steps the gradient scaler skips)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    value = float(value)
    return value if math.isfinite(value) else None


def _fp32(state: dict) -> dict:
    """Floating-point tensors as fp32 on the CPU: the same checkpoint under every precision."""
    return {k: v.detach().float().cpu() if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
