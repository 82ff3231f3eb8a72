"""Content fingerprints that key the embedding cache: weights, image items, token tensors, option sets.

A fingerprint changes whenever what it describes could change the features, and only then: weights
are hashed value by value (not by file, so a checkpoint that re-saves the same trunk matches),
images by their bytes or by their file's size and modification time, texts by their token ids.
"""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import torch

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _new() -> "hashlib._Hash":
    return hashlib.sha256()


def digest_json(value) -> str:
    """sha256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def digest_tensors(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and values of `state`, in name order."""
    h = _new()
    for name in sorted(state):
        t = state[name].detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.contiguous().reshape(-1)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)  # numpy has no bfloat16; the bits are what matter
        h.update(t.numpy().data.cast("B"))
    return h.hexdigest()


def digest_items(items: list[dict]) -> str:
    """sha256 of an ordered image list: each item's bytes, or its path with its size/mtime stamp."""
    import fsspec

    h = _new()
    for it in items:
        if it.get("bytes") is not None:
            h.update(b"B")
            h.update(hashlib.sha256(it["bytes"]).digest())
            continue
        stamp = it.get("stamp")
        if stamp is None:
            fs, path = fsspec.core.url_to_fs(it["path"])
            try:
                info = fs.info(path)
            except FileNotFoundError:
                info = {"missing": True}  # left for the decode step to report and skip
            stamp = json.dumps({k: info.get(k) for k in ("size", "mtime", "ETag", "LastModified", "missing")},
                               sort_keys=True, default=str)
        h.update(f"P{it['path']}\x00{stamp}\x00".encode())
    return h.hexdigest()


def digest_array(array: np.ndarray | torch.Tensor) -> str:
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    h = _new()
    h.update(f"{a.dtype}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).reshape(-1).data.cast("B"))
    return h.hexdigest()


def describe_transform(transform) -> str:
    """A transform's repr without object addresses (open_clip composes plain functions into it)."""
    return _ADDRESS.sub("", repr(transform))
