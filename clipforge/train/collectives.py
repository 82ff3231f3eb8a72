"""The few collectives the training loop needs, usable with or without an initialised process group.

Without torch.distributed (a single process) every function returns the local value, so the loop
runs unchanged in one process and on many ranks.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if distributed() else 0


def _reduce(values: list[float], op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if distributed():
        dist.all_reduce(t, op=op)
    return t.tolist()


def all_min_int(value: int) -> int:
    if not distributed():
        return value
    return int(_reduce([float(value)], dist.ReduceOp.MIN)[0])


def all_sum_int(value: int) -> int:
    if not distributed():
        return value
    return int(_reduce([float(value)], dist.ReduceOp.SUM)[0])


def all_mean(value: float) -> float:
    """Mean over ranks; a NaN or inf on any rank makes the result non-finite on every rank."""
    if not distributed():
        return value
    return _reduce([value], dist.ReduceOp.SUM)[0] / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_zero(obj: Any) -> Any:
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if distributed():
        dist.barrier()
