"""The training state a checkpoint holds of a wrapped module and its optimizer, and how it is loaded back.

The layout written today is full and strategy-independent:

  model:     the unwrapped model's full state dict, fp32 (frozen towers included);
  optimizer: torch.optim's own state-dict layout (parameters numbered in the optimizer's order, that is
             decayed weights first, then the rest, each in model order), with full, unsharded tensors.

So a checkpoint written under one strategy resumes under any other. `CheckpointState.state_dicts` is a
collective (every rank calls it; rank 0 receives the dicts and writes them), `load_optimizer_state` runs on
every rank with the full dict each rank read from the checkpoint. 0-dim parameters that a sharded strategy
holds as [1] (`parallelize.promote_scalars`) get their own shapes back in both dicts.

A `CheckpointState` is made per strategy by `checkpoint_state_of` (DeepSpeed: `deepspeed_engine`); how a
strategy gathers its tensors is its `_full_state` and `_load`, the common layout is this base class's. A sharded
layout (torch.distributed.checkpoint, each rank writing its own shards) would be another `CheckpointState`
whose `state_dicts` gives every rank its shards (torch.distributed.checkpoint.state_dict without
full_state_dict) and whose writer runs on every rank.
"""
from __future__ import annotations

import torch
from torch import nn

from clipforge.train.collectives import rank
from clipforge.train.optimizer import optimizer_parameter_names, with_kernel_flags_of
from clipforge.train.parallelize import Wrapped, promoted_scalar_names


class CheckpointState:
    """Model and optimizer state of `root` and `optimizer` in the full layout. The base class reads plain
    tensors of this process (a single process, ddp)."""

    def __init__(self, root: nn.Module, optimizer: torch.optim.Optimizer):
        self.root = root  # the unwrapped trained module
        self.optimizer = optimizer

    def state_dicts(self, model: nn.Module) -> tuple[dict | None, dict | None]:
        """(model state, optimizer state) of `model` (the whole model `root` is part of) in the full layout on
        rank 0, (None, None) elsewhere."""
        gathered = self._full_state(model)
        if gathered is None:
            return None, None
        model_state, optimizer_state = gathered
        return (fp32(restore_scalar_shapes(model, model_state)),
                scalar_states_as(self.root, self.param_names(), optimizer_state, ()))

    def load_optimizer_state(self, state: dict) -> None:
        """Load a full optimizer state (as `state_dicts` gives it) into this run's optimizer, on every rank."""
        self._load(scalar_states_as(self.root, self.param_names(), state, (1,)))

    def param_names(self) -> list[str]:
        """Names of the optimizer's parameters in its own order (the numbering of its state dict)."""
        return optimizer_parameter_names(self.root, self.optimizer)

    @property
    def optimizer_state(self) -> _OptimizerLoader:
        """What run_checkpoints.restore_training_state loads the optimizer state into."""
        return _OptimizerLoader(self)

    # ------------------------------------------------------------------ per strategy

    def _full_state(self, model: nn.Module) -> tuple[dict, dict] | None:
        """(model state, torch.optim-numbered optimizer state) with full tensors on rank 0; None elsewhere."""
        if rank() != 0:
            return None
        return model.state_dict(), self.optimizer.state_dict()

    def _load(self, state: dict) -> None:
        """`state` (full, numbered, promoted scalars already [1]) into this rank's optimizer."""
        self.optimizer.load_state_dict(with_kernel_flags_of(self.optimizer, state))


class ShardedCheckpointState(CheckpointState):
    """FSDP2: full state dicts gathered from the DTensor shards (torch.distributed.checkpoint.state_dict)."""

    def _full_state(self, model):
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
        if rank() != 0:
            return None
        return model_state, _numbered_optimizer_state(optim_state, self.param_names())

    def _load(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = with_kernel_flags_of(self.optimizer, state)
        if not state.get("state"):
            return  # written before any update: the fresh optimizer is that state
        by_name = _named_optimizer_state(state, self.param_names())
        set_optimizer_state_dict(self.root, self.optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def checkpoint_state_of(wrapped: Wrapped, optimizer: torch.optim.Optimizer) -> CheckpointState:
    """The checkpoint state of a module wrapped by `parallelize` and the optimizer built over it."""
    return (ShardedCheckpointState if wrapped.sharded else CheckpointState)(wrapped.root, optimizer)


class _OptimizerLoader:
    """load_state_dict(full state) -> CheckpointState.load_optimizer_state, for the checkpoint reader."""

    def __init__(self, state: CheckpointState):
        self.state = state

    def load_state_dict(self, state_dict: dict) -> None:
        self.state.load_optimizer_state(state_dict)


class Held:
    """A state dict already gathered, handed to the checkpoint writer (which calls `.state_dict()`)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


# ---------------------------------------------------------------------- 0-dim parameters


def restore_scalar_shapes(module: nn.Module, state: dict) -> dict:
    """A model state dict with `module`'s promoted scalars back to 0-dim."""
    scalars = promoted_scalar_names(module)
    return {k: v.reshape(()) if k in scalars and isinstance(v, torch.Tensor) and v.numel() == 1 else v
            for k, v in state.items()}


def scalar_states_as(module: nn.Module, names: list[str], state: dict, shape: tuple) -> dict:
    """Optimizer state (numbered by `names`) with the moments of `module`'s promoted scalars reshaped to `shape`."""
    scalars = promoted_scalar_names(module)
    if not scalars or not state.get("state"):
        return state
    out = {**state, "state": dict(state["state"])}
    for index, per_param in state["state"].items():
        if names[int(index)] in scalars:
            out["state"][index] = {k: v.reshape(shape) if k != "step" and isinstance(v, torch.Tensor) else v
                                   for k, v in per_param.items()}
    return out


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


def fp32(state: dict) -> dict:
    """Floating-point tensors as fp32 on the CPU: the same checkpoint under every precision."""
    return {k: v.detach().float().cpu() if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
