"""Run a function in several local gloo processes, the way DDP training ranks run, and collect results."""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ports import free_port


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


class TwoHeads(nn.Module):
    """A minimal dual encoder for loss tests: one linear head per modality and a learnable temperature."""

    def __init__(self):
        super().__init__()
        self.img = nn.Linear(5, 8)
        self.txt = nn.Linear(6, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_img, x_txt):
        return F.normalize(self.img(x_img), dim=-1), F.normalize(self.txt(x_txt), dim=-1), self.logit_scale.exp()


def two_heads_and_inputs(n: int, dtype: torch.dtype = torch.float32):
    """The same seeded model and inputs in every process, so ranks can slice one global batch."""
    torch.manual_seed(0)
    model = TwoHeads().to(dtype)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 6, generator=g, dtype=dtype)


@lru_cache(maxsize=None)
def open_clip_loss():
    """open_clip's own loss module, loaded from its file alone (it imports nothing but torch).

    Importing the open_clip package pulls in timm and transformers, which would cost every spawned
    rank many seconds for no purpose here.
    """
    package = Path(next(iter(importlib.util.find_spec("open_clip").submodule_search_locations)))
    spec = importlib.util.spec_from_file_location("open_clip_loss", package / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
