"""Contrastive training on Ray Train (`kind: train`): `run_train(spec)` is the entry point.

`run_train` is imported lazily: `clipforge.train.spec` is needed by every job spec, and the
training modules import torch, open_clip and Ray.
"""
from __future__ import annotations

from typing import Any

__all__ = ["run_train"]


def __getattr__(name: str) -> Any:
    if name == "run_train":
        from clipforge.train.runner import run_train

        return run_train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
