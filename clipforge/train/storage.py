"""The run directory's files (local or fsspec): paths, small text files and the metrics log."""
from __future__ import annotations

import json
import math
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def is_local(path: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(path)
    return isinstance(fs, LocalFileSystem)


def write_text(path: str, text: str) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(p, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> dict:
    with fsspec.open(path, "r", encoding="utf-8") as f:
        return json.load(f)


class MetricsLog:
    """Appends one JSON object per line. Object stores cannot append, so there the whole file is rewritten.

    A resumed run first drops the lines logged after its checkpoint's step (by the run that was cut
    off), so the log reads as one uninterrupted run.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        self.local = is_local(path)
        self.lines: list[str] = []
        fs, p = fsspec.core.url_to_fs(path)
        if resume_step is not None and fs.exists(p):
            with fs.open(p, "r", encoding="utf-8") as f:
                self.lines = [line for line in f.read().splitlines() if _step_of(line) <= resume_step]
        write_text(path, "".join(line + "\n" for line in self.lines))

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True)
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            return
        self.lines.append(line)
        write_text(self.path, "\n".join(self.lines) + "\n")


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf  # unreadable lines are dropped on resume
