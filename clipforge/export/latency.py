"""Latency of embedding backends, measured interleaved so that they share the machine's ups and downs.

Each repeat runs every backend once per batch size (image tower, then text tower) on the same
preprocessed pixels and token ids; the order of the backends rotates from one repeat to the next,
so none is always first after another's cache effects. Reported: the median over repeats.
Preprocessing and tokenization are excluded (they are the same Pillow / tokenizer work for all).
"""
from __future__ import annotations

import time

import numpy as np


def _timed(fn, arg) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def _tile(array: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(array))
    return np.concatenate([array] * reps)[:n]


def measure(backends: dict, pixels: np.ndarray, tokens: np.ndarray, batch_sizes=(1, 32), repeats: int = 5,
            warmup: int = 1) -> dict:
    """{backend: {"batch_<B>": {"image_ms", "text_ms", "total_ms", "runs"}}}, medians over `repeats` runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    inputs = {b: (_tile(pixels, b), _tile(tokens, b)) for b in batch_sizes}
    names = list(backends)
    for name in names:
        for b in batch_sizes:
            for _ in range(warmup):
                backends[name].embed_pixels(inputs[b][0])
                backends[name].embed_tokens(inputs[b][1])
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {(n, b): [] for n in names for b in batch_sizes}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for b in batch_sizes:
            for name in order:
                backend = backends[name]
                runs[(name, b)].append((_timed(backend.embed_pixels, inputs[b][0]),
                                        _timed(backend.embed_tokens, inputs[b][1])))
    out: dict = {name: {} for name in names}
    for (name, b), times in runs.items():
        image = np.array([t[0] for t in times]) * 1000
        text = np.array([t[1] for t in times]) * 1000
        out[name][f"batch_{b}"] = {"image_ms": round(float(np.median(image)), 3),
                                   "text_ms": round(float(np.median(text)), 3),
                                   "total_ms": round(float(np.median(image + text)), 3),
                                   "runs": len(times)}
    return out
