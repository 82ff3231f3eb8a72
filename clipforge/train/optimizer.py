"""AdamW with decay only where it regularises, the names of its parameters in its own order, its kernel, and the
warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from clipforge.train.spec import OptimSpec


def _decays(name: str, param: nn.Parameter) -> bool:
    # Norm scales, biases and embeddings' 1-D vectors are not weights to shrink; nor is the temperature.
    return param.ndim >= 2 and "logit_scale" not in name


def build_optimizer(module: nn.Module, spec: OptimSpec, names: Iterable[str] | None = None,
                    fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over `names` (default: the parameters that require grad), in the module's parameter order.

    Weight decay applies to >=2-D weights only. A staged fine-tuning schedule passes every parameter that
    trains in some stage: parameters frozen in the current stage have no gradient, and AdamW leaves a
    parameter without gradient untouched (weight decay included), so one optimizer serves all stages.
    `spec.state_dtype: bf16` keeps the moments in bfloat16 (AdamWBF16State).

    `fused`: torch's fused AdamW kernel, where torch has one for every parameter (the caller knows the
    parameters are plain tensors of this process). On CPU torch.optim.AdamW otherwise loops over the parameters
    with a dozen element-wise operations each; the fused kernel makes one pass: for the from-scratch MiniCLIP's
    19 M parameters on one core, 0.15 s -> 0.02 s a step, some 7% of its training step. Same update rule
    (results agree to rounding). The bf16-state optimizer has no fused kernel and ignores it.
    """
    wanted = None if names is None else set(names)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in module.named_parameters():
        if (p.requires_grad if wanted is None else name in wanted):
            (decay if _decays(name, p) else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: no parameter requires grad (check model.trainable)")
    groups = [g for g in ({"params": decay, "weight_decay": spec.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if spec.state_dtype == "bf16":
        from clipforge.models.adamw_bf16 import AdamWBF16State

        return AdamWBF16State(groups, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps)
    betas = (spec.beta1, spec.beta2)
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=spec.lr, betas=betas, eps=spec.eps, fused=True)
        except RuntimeError:  # a device or dtype without the fused kernel
            pass
    return torch.optim.AdamW(groups, lr=spec.lr, betas=betas, eps=spec.eps)


def optimizer_parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of `optimizer`'s parameters (of `module`) in its own order: the numbering of its state dict."""
    names = {p: n for n, p in module.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]


# Which implementation torch.optim runs; saved in every param group, but a property of this run, not of the state.
_KERNEL_FLAGS = ("fused", "foreach")


def with_kernel_flags_of(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """`state` with `optimizer`'s own kernel flags in its param groups (torch's load_state_dict takes the saved
    groups' flags), so a checkpoint resumes on this run's kernel whichever kernel or strategy wrote it."""
    saved = state.get("param_groups") or []
    if len(saved) != len(optimizer.param_groups):
        return state  # torch's load_state_dict names the mismatch
    groups = [{**g, **{k: mine[k] for k in _KERNEL_FLAGS if k in mine}}
              for g, mine in zip(saved, optimizer.param_groups)]
    return {**state, "param_groups": groups}


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `peak`, then cosine to 0 at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets the optimizer's learning rate before each step.

    Only the step position is state: on resume the curve is recomputed from the current spec, so a run
    extended to more epochs stretches its decay instead of replaying the old one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, spec: OptimSpec, total_steps: int):
        self.optimizer = optimizer
        self.peak = spec.lr
        self.warmup_steps = spec.warmup_steps
        self.total_steps = total_steps
        self.step_index = 0

    def apply(self) -> float:
        lr = lr_at(self.step_index, self.peak, self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step_index += 1

    def state_dict(self) -> dict:
        return {
            "kind": "warmup_cosine",
            "step": self.step_index,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_index = int(state["step"])
