"""What one optimizer step does to a wrapped module: forward in the run's precision, backward through the
gradient scaler, clipping and the gradient norm, the optimizer step, dropping a step whose loss is not
finite, and the temperature clamp.

`TrainStep` serves a single process, ddp and fsdp2 (torch autograd and torch.optim; FSDP2's DTensors are
made whole where a number is read). DeepSpeed's engine runs backward and the step itself
(`deepspeed_engine.DeepSpeedStep`).
"""
from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from clipforge.train import precision
from clipforge.train.parallelize import Wrapped
from clipforge.train.spec import TrainSpec


def temperature(root: nn.Module) -> nn.Parameter:
    """The CLIP model's logit_scale parameter (torch types a module attribute as `Tensor | Module`)."""
    return cast(nn.Parameter, root.logit_scale)


class TrainStep:
    """The step of `wrapped` with `optimizer`; `scaler` is amp_fp16's gradient scaler (None otherwise)."""

    def __init__(self, wrapped: Wrapped, optimizer: torch.optim.Optimizer, spec: TrainSpec,
                 scaler: torch.amp.GradScaler | None = None):
        self.wrapped = wrapped
        self.optimizer = optimizer
        self.spec = spec
        self.scaler = scaler

    @property
    def root(self) -> nn.Module:
        return self.wrapped.root

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The module's outputs in fp32 (the loss runs in fp32 under every precision)."""
        inputs = precision.cast_inputs(inputs, self.spec.precision)
        with precision.autocast(self.spec.precision, self.wrapped.device):
            outputs = self.wrapped.module(*inputs)
        return tuple(o.float() for o in outputs)

    def no_sync(self):
        """Suspends gradient synchronisation for the non-final passes of an accumulated step."""
        return self.wrapped.no_sync()

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
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        return grad_norm_value(norm)

    def drop(self) -> None:
        """Discard this step's gradients (a non-finite loss): no parameter moves."""
        self.zero_grad()

    def needs_backward_to_drop(self) -> bool:
        """Whether a dropped step still runs backward (wrappers that expect every forward to have one)."""
        return True

    def clamp_logit_scale(self, max_scale: float) -> None:
        """Keep exp(logit_scale) within [1, max_scale], as CLIP does after each step."""
        with torch.no_grad():
            temperature(self.root).clamp_(0, math.log(max_scale))

    def logit_scale(self) -> float:
        # Sharded (fsdp2): a one-element DTensor held by one rank (clamping it in place clamps that shard).
        return float(_whole(temperature(self.root).detach()).float().exp().reshape(-1)[0])


def _whole(value: Any) -> Any:
    """A DTensor gathered into one tensor on every rank (a collective); anything else as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def grad_norm_value(value: Any) -> float | None:
    """A gradient norm as a number; None when it overflowed (fp16 steps the gradient scaler skips)."""
    value = float(_whole(value))
    return value if math.isfinite(value) else None
