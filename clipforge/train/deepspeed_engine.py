"""DeepSpeed ZeRO: the engine wraps the module together with its optimizer and runs forward, backward and the
step (clipping included); its checkpoint state gathers the common full layout out of ZeRO's partitions.

DeepSpeed is imported only here, when a run asks for it. On CPU-only machines it runs on its CPU
accelerator (DS_ACCELERATOR=cpu) over the gloo process group Ray Train created.

The optimizer is clipforge's own (AdamW with its weight-decay groups, or the bf16-state AdamW), handed
to DeepSpeed, which runs it on its fp32 partitions. Checkpoints use the common full format: weights and
optimizer moments are gathered per parameter (`safe_get_full_*`), so they resume under any strategy.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Iterator

import torch
from torch import nn

from clipforge.train import precision
from clipforge.train.checkpoint_state import CheckpointState
from clipforge.train.collectives import rank
from clipforge.train.deepspeed_config import deepspeed_config
from clipforge.train.optimizer import build_optimizer, optimizer_parameter_names
from clipforge.train.parallelize import Wrapped, promote_scalars
from clipforge.train.spec import TrainSpec
from clipforge.train.train_step import TrainStep, grad_norm_value, temperature

log = logging.getLogger(__name__)


def _import_deepspeed(device: torch.device):
    # The accelerator is chosen when deepspeed is first imported.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed logs its whole config and every step's timing at INFO on each rank.
    ds_logger.setLevel(max(logging.WARNING, ds_logger.level))
    return deepspeed


def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def deepspeed_parts(module: nn.Module, spec: TrainSpec, device: torch.device, names: list[str] | None
                    ) -> tuple[DeepSpeedWrapped, torch.optim.Optimizer, DeepSpeedStep, DeepSpeedCheckpointState]:
    """`module` (on `device`) in a DeepSpeed engine with clipforge's optimizer over `names` (default: the
    parameters that require grad): (wrapped module, optimizer, step, checkpoint state)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("strategy deepspeed needs the process group of a Ray Train run")
    deepspeed = _import_deepspeed(device)
    # DeepSpeed's broadcasts and ZeRO-3 partitions view every parameter as bytes, which 0-dim tensors forbid.
    promote_scalars(module)
    optimizer = build_optimizer(module, spec.optim, names)
    # ZeRO replaces the optimizer's parameter lists by flat partitions: keep the original order.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    param_names = optimizer_parameter_names(module, optimizer)
    group_sizes = [len(g["params"]) for g in optimizer.param_groups]
    os.environ.setdefault("LOCAL_RANK", str(torch.distributed.get_rank()))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(spec),
                                           dist_init_required=False)
    wrapped = DeepSpeedWrapped(module, device, engine, deepspeed, spec.parallel.zero_stage)
    # DeepSpeed scales fp16 losses itself: no gradient scaler.
    return (wrapped, optimizer, DeepSpeedStep(wrapped, optimizer, spec),
            DeepSpeedCheckpointState(wrapped, optimizer, params, param_names, group_sizes))


class DeepSpeedWrapped(Wrapped):
    """The engine as the module forward runs through (it casts the module itself in its bf16 mode)."""

    def __init__(self, root: nn.Module, device: torch.device, engine, deepspeed, zero_stage: int):
        super().__init__(root, device)
        self.sharded = zero_stage == 3  # ZeRO-1/2 keep parameters whole (they partition optimizer state, gradients)
        self.engine = engine
        self.module = engine
        self.deepspeed = deepspeed
        self.zero_stage = zero_stage

    def gathered_parameters(self, params: list[nn.Parameter], modifier_rank: int | None = None):
        """`params` whole inside the context (ZeRO-3 partitions them; other stages keep them whole)."""
        if self.zero_stage == 3:
            return self.deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        with self.gathered_parameters(list(self.root.parameters())):
            yield


class DeepSpeedStep(TrainStep):
    """The engine's backward and step; the temperature is clamped in both of its copies."""

    wrapped: DeepSpeedWrapped

    def forward(self, *inputs):
        # DeepSpeed runs the forward under its own autocast (amp) or on its bf16 module (pure_bf16).
        inputs = precision.cast_inputs(inputs, self.spec.precision)
        return tuple(o.float() for o in self.wrapped.engine(*inputs))

    def zero_grad(self) -> None:
        """The engine clears gradients in its own step."""

    def backward(self, loss):
        self.wrapped.engine.backward(loss)

    def step(self, max_norm):
        # Clipping is the engine's (`gradient_clipping` in its config).
        self.wrapped.engine.step()
        norm = self.wrapped.engine.get_global_grad_norm()
        return grad_norm_value(norm) if norm is not None else None

    def needs_backward_to_drop(self) -> bool:
        # A step without backward leaves nothing in the engine's gradient partitions to clear.
        return False

    def drop(self) -> None:
        pass

    def clamp_logit_scale(self, max_scale: float) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        p = temperature(self.root)
        master = safe_get_full_fp32_param(p)  # every rank takes part
        high = math.log(max_scale)
        if master is None or (float(master.min()) >= 0 and float(master.max()) <= high):
            return
        clamped = master.clamp(0, high)
        # Both copies: the fp32 master (what the optimizer updates) and the module's (what forward reads).
        safe_set_full_fp32_param(p, clamped)
        with torch.no_grad(), self.wrapped.gathered_parameters([p], modifier_rank=0):
            p.data.copy_(clamped.reshape(p.data.shape).to(p.dtype))

    def logit_scale(self) -> float:
        from deepspeed.utils import safe_get_full_fp32_param

        return float(safe_get_full_fp32_param(temperature(self.root)).exp().reshape(-1)[0])


class DeepSpeedCheckpointState(CheckpointState):
    """The full layout gathered out of ZeRO's partitions, and loaded back into them.

    `params`, `names` and `group_sizes` are the optimizer's parameters, their names and its groups' sizes as
    they were before ZeRO replaced its parameter lists by flat partitions.
    """

    def __init__(self, wrapped: DeepSpeedWrapped, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 names: list[str], group_sizes: list[int]):
        super().__init__(wrapped.root, optimizer)
        self.wrapped = wrapped
        self.engine = wrapped.engine
        self.zero_stage = wrapped.zero_stage
        self._params = params
        self._names = names
        self._group_sizes = group_sizes

    def param_names(self) -> list[str]:
        return list(self._names)

    def _link_optimizer_state(self) -> None:
        # ZeRO-1/2 links each parameter to its slice of the optimizer state once, after the first step of
        # the first parameter group, when later groups have no state yet: link again before any access.
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _inner_states(self) -> list[dict]:
        # The client optimizer, now keyed by ZeRO's flat fp32 partitions (ZeRO-3 lists them in its param
        # groups only during its step).
        return list(self.engine.optimizer.optimizer.state.values())

    def _flat_partitions(self) -> list[torch.Tensor]:
        zero = self.engine.optimizer
        flats = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        return list(flats if flats is not None else zero.single_partition_of_fp32_groups)

    def _create_optimizer_state(self) -> None:
        """The moments a first step would create (zeros), so that a checkpoint's can be loaded into them."""
        from clipforge.models.adamw_bf16 import AdamWBF16State

        inner = self.engine.optimizer.optimizer
        bf16_state = isinstance(inner, AdamWBF16State)
        for flat in self._flat_partitions():
            if inner.state.get(flat):
                continue
            moments = torch.bfloat16 if bf16_state else flat.dtype
            inner.state[flat] = {
                "step": 0 if bf16_state else torch.tensor(0.0),
                "exp_avg": torch.zeros_like(flat, dtype=moments),
                "exp_avg_sq": torch.zeros_like(flat, dtype=moments),
            }

    def _moment_keys(self) -> list[str]:
        states = self._inner_states()
        return [k for k, v in states[0].items() if k != "step" and isinstance(v, torch.Tensor)] if states else []

    def _step_count(self):
        states = self._inner_states()
        return states[0].get("step") if states else None

    def _full_state(self, model):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if model is not self.root:
            raise ValueError("deepspeed trains the whole model: the checkpointed model must be the wrapped one")
        self._link_optimizer_state()
        with self.wrapped.gathered_parameters(list(model.parameters())):
            model_state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        names = self.param_names()
        keys, step = self._moment_keys(), self._step_count()
        # DeepSpeed gathers in fp32; the checkpoint keeps the moments' own dtype (bf16 with state_dtype bf16).
        dtypes = {k: v.dtype for k, v in self._inner_states()[0].items() if k in keys} if keys else {}
        per_param: dict[int, dict] = {}
        for i, (name, p) in enumerate(zip(names, self._params)):
            # Each call is a collective over the ranks holding parts of `p`.
            master = safe_get_full_fp32_param(p)
            if master is not None:
                model_state[name] = master.detach().float().cpu().reshape(_full_shape(p))
            if step is not None:
                per_param[i] = {"step": step.clone() if isinstance(step, torch.Tensor) else step}
                for key in keys:
                    value = safe_get_full_optimizer_state(p, key).detach().cpu().reshape(_full_shape(p))
                    per_param[i][key] = value.to(dtypes[key])
        if rank() != 0:
            return None
        inner = self.engine.optimizer.optimizer
        groups, start = [], 0
        for group, original in zip(inner.param_groups, self._group_sizes):
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + original))})
            start += original
        return model_state, {"state": per_param, "param_groups": groups}

    def _set_zero3_state(self, p: nn.Parameter, value: torch.Tensor, key: str) -> None:
        """This rank's part of `value` into its ZeRO-3 partition of the optimizer state `key`.

        DeepSpeed's own setter reads past the end of a value whose size the ranks do not divide evenly
        (its partitions are padded): the padding is filled with zeros here.
        """
        zero = self.engine.optimizer
        part, _ = zero._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        start = part.numel() * zero._get_param_partition_rank(p)
        piece = value.flatten()[start:start + part.numel()]
        with torch.no_grad():
            part.zero_()
            part[:piece.numel()].copy_(piece.to(part.dtype))

    def _load(self, state):
        # The moments go straight into ZeRO's partitions (no torch load_state_dict: its kernel flags do not matter).
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = state.get("state") or {}
        if len(self._params) != sum(len(g["params"]) for g in state.get("param_groups", [])):
            raise ValueError("the checkpoint's optimizer holds other parameters than this run's; model.trainable "
                             "must list the same parameters as when it was written")
        if not saved:
            return
        self._create_optimizer_state()
        self._link_optimizer_state()
        keys = self._moment_keys()
        for i, p in enumerate(self._params):
            per_param = saved.get(i, saved.get(str(i)))
            if per_param is None:
                continue
            for key in keys:
                if key in per_param:
                    value = per_param[key].float().reshape(_full_shape(p))
                    if self.zero_stage == 3:
                        self._set_zero3_state(p, value, key)
                    else:
                        safe_set_full_optimizer_state(p, value, key)
        step = next((v["step"] for v in saved.values() if "step" in v), None)
        if step is not None:
            for inner_state in self._inner_states():
                current = inner_state.get("step")
                inner_state["step"] = (torch.tensor(float(step), dtype=current.dtype)
                                       if isinstance(current, torch.Tensor) else int(step))
