"""Small files on any fsspec path (local folders, s3://, memory://, ...): joining paths, writing and reading text
and JSON."""
from __future__ import annotations

import json
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
