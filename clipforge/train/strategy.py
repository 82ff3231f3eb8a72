"""The parts of a parallelism strategy that training uses, built in the order the strategy needs.

  wrapped:   the module placed and wrapped (`parallelize.py`);
  optimizer: clipforge's AdamW over the wrapped parameters (`optimizer.py`);
  step:      backward, clipping, the optimizer step, the temperature clamp (`train_step.py`);
  state:     the checkpoint's model and optimizer state, strategy-independent (`checkpoint_state.py`).

ddp, fsdp2 and a single process wrap first and build the optimizer over the wrapped parameters (FSDP2's
are DTensors). DeepSpeed's engine takes the optimizer when it wraps the module: `deepspeed_engine.py`
builds all four parts itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clipforge.train import precision
from clipforge.train.checkpoint_state import CheckpointState, checkpoint_state_of
from clipforge.train.optimizer import build_optimizer
from clipforge.train.parallelize import Wrapped, parallelize
from clipforge.train.spec import TrainSpec
from clipforge.train.train_step import TrainStep


@dataclass
class Strategy:
    wrapped: Wrapped
    optimizer: torch.optim.Optimizer
    step: TrainStep
    state: CheckpointState


def build_strategy(module: nn.Module, spec: TrainSpec, device: torch.device | None = None,
                   names: list[str] | None = None) -> Strategy:
    """`module` on `device`, wrapped as `spec.strategy` asks, with its optimizer over `names` (default: the
    parameters that require grad), its step and its checkpoint state."""
    device = device or torch.device("cpu")
    if spec.strategy == "deepspeed":
        from clipforge.train.deepspeed_engine import deepspeed_parts

        # DeepSpeed casts the module itself (its bf16 mode) and needs its process group even for one rank.
        return Strategy(*deepspeed_parts(module.to(device), spec, device, names))
    wrapped = parallelize(module, spec, device)
    # torch's fused AdamW kernel needs plain tensors of this process (not FSDP2's DTensors).
    optimizer = build_optimizer(wrapped.root, spec.optim, names, fused=not wrapped.sharded)
    scaler = precision.grad_scaler(spec.precision, device, sharded=wrapped.sharded)
    return Strategy(wrapped, optimizer, TrainStep(wrapped, optimizer, spec, scaler),
                    checkpoint_state_of(wrapped, optimizer))
