"""Run a function in several local gloo processes, the way DDP training ranks run, and collect results."""
from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, args: tuple = ()) -> list[Any]:
    """fn(rank, world_size, *args) in `world_size` spawned processes joined by a gloo process group.

    `fn` must be importable by name (a module-level function); each rank's return value (tensors and
    plain data) comes back in rank order. A failure in any rank raises here with its traceback.
    """
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_entry, args=(world_size, free_port(), outdir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
