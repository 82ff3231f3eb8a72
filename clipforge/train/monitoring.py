"""What a metrics line says beside the loss: time spent waiting for data, memory, and who the workers are."""
from __future__ import annotations

import os
import socket
import time
from typing import Iterator, TypeVar

import psutil
import torch

from clipforge.runtime.fs_files import join, write_json
from clipforge.runtime.run_dir import WORKERS_DIR
from clipforge.train.collectives import all_gather_object

T = TypeVar("T")


class DataWait:
    """Seconds spent waiting for the next batch since the last `take()`."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, items: Iterator[T]) -> Iterator[T]:
        while True:
            t0 = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - t0
            yield item

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def memory(device: torch.device) -> dict[str, int]:
    """This process's resident memory and, on a GPU, the peak memory allocated by torch (bytes)."""
    out = {"memory_rss": psutil.Process().memory_info().rss}
    if device.type == "cuda":
        out["memory_cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return out


def line_resources(wait_seconds: float, steps: int, step_time: float, device: torch.device) -> dict:
    """Data wait (mean over ranks, per step) and memory (largest rank) for a metrics line.

    A collective: every rank calls it at the same step.
    """
    mine = {"wait": wait_seconds / max(steps, 1), **memory(device)}
    ranks = all_gather_object(mine)
    wait = sum(r["wait"] for r in ranks) / len(ranks)
    out = {"data_wait": wait, "data_wait_fraction": min(1.0, wait / step_time) if step_time > 0 else 0.0}
    for key in mine:
        if key != "wait":
            out[key] = max(r[key] for r in ranks)
    return out


def worker_file(storage: str, rank: int) -> str:
    return join(storage, WORKERS_DIR, f"rank_{rank}.json")


def write_worker_file(storage: str, rank: int, **fields) -> None:
    """STORAGE/workers/rank_N.json: which process is rank N in the current attempt (rewritten on every restart)."""
    write_json(worker_file(storage, rank), {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                                            "started": time.time(), **fields})
