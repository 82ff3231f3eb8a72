"""The one place where a module is placed on its device and wrapped for the parallelism strategy.

Everything else in training sees the wrapped module for forward/backward and `unwrap(...)` for
state dicts, so adding a strategy (FSDP2, DeepSpeed) means changing this file only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.train.collectives import distributed
from clipforge.train.spec import TrainSpec


def parallelize(module: nn.Module, spec: TrainSpec, device: torch.device | None = None) -> nn.Module:
    """Move `module` to `device` and wrap it as `spec.strategy` asks (no wrapper in a single process)."""
    device = device or torch.device("cpu")
    module = module.to(device)
    if spec.strategy == "ddp":
        if not distributed():
            return module
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError("ddp: the module has no trainable parameters to synchronise")
        # DDP broadcasts rank 0's parameters and buffers here, so every rank starts from the same weights.
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    raise ValueError(f"strategy `{spec.strategy}` is not supported")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under any strategy wrapper (for state dicts and parameter access)."""
    return module.module if isinstance(module, DistributedDataParallel) else module
