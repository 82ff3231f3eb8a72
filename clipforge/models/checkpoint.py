"""The project's checkpoint format, on any fsspec filesystem (local paths, s3://, memory://, ...).

A checkpoint is a directory:
    model.pt       state dict of the CLIP model (open_clip-loadable: `open_clip.create_model(name, pretrained=...)`)
    optimizer.pt   optimizer state (optional)
    extra.pt       anything else a trainer needs to resume: scheduler, step counters (optional; tensors
                   and plain Python data only, as all files are read with torch.load(weights_only=True))
    meta.json      written last: its presence marks the checkpoint complete
A run directory keeps its checkpoints in `checkpoints/<name>` (e.g. step_000120, epoch_0003).
"""
from __future__ import annotations

import json
import re
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from clipforge.models.errors import CheckpointError

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
EXTRA_FILE = "extra.pt"
META_FILE = "meta.json"
CHECKPOINTS_DIR = "checkpoints"


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(path)
    return fs, root.rstrip("/") or root


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path the caller can pass back in: plain for local files, with its protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _clean_model_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU tensors under the bare model's names (a DDP `module.` prefix is dropped)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _save_torch(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    with fs.open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(directory: str, model_state: dict, meta: dict, optimizer_state: dict | None = None,
                    extra: dict | None = None) -> str:
    """Write a checkpoint directory (meta.json last) and return its path."""
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"checkpoint meta for {directory} must be JSON-serialisable: {e}") from e
    fs, root = _fs(directory)
    fs.makedirs(root, exist_ok=True)
    meta_path = _join(root, META_FILE)
    if fs.exists(meta_path):
        # Rewriting a directory: it is incomplete until the new meta.json lands.
        fs.rm(meta_path)
    _save_torch(fs, _join(root, MODEL_FILE), _clean_model_state(model_state))
    if optimizer_state is not None:
        _save_torch(fs, _join(root, OPTIMIZER_FILE), optimizer_state)
    if extra is not None:
        _save_torch(fs, _join(root, EXTRA_FILE), extra)
    tmp = _join(root, META_FILE + ".tmp")
    with fs.open(tmp, "w") as f:
        f.write(meta_text)
    fs.mv(tmp, meta_path)
    return _url(fs, root)


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _read_meta(fs: fsspec.AbstractFileSystem, checkpoint_dir: str) -> dict[str, Any]:
    path = _join(checkpoint_dir, META_FILE)
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{_url(fs, checkpoint_dir)} is not a complete checkpoint (no {META_FILE})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint metadata {_url(fs, path)} is not valid JSON: {e}") from e


def find_latest_checkpoint(path: str) -> str | None:
    """`path` itself if it is a complete checkpoint, else the newest complete one under `path/checkpoints/`
    (or directly under `path`); None if there is none.

    Newest = highest `step` recorded in meta.json, then the natural order of the directory names
    (step_000120 after step_000099). Directories without meta.json were cut off mid-write and are skipped.
    """
    fs, root = _fs(path)
    # Object-store filesystems cache listings; other processes may have written checkpoints since.
    fs.invalidate_cache()
    if fs.exists(_join(root, META_FILE)):
        return path
    parent = _join(root, CHECKPOINTS_DIR)
    if not fs.isdir(parent):
        parent = root
        if not fs.isdir(parent):
            return None
    complete = []
    for entry in fs.ls(parent, detail=True):
        if entry.get("type") != "directory":
            continue
        d = entry["name"].rstrip("/")
        if not fs.exists(_join(d, META_FILE)):
            continue
        try:
            step = _read_meta(fs, d).get("step")
        except CheckpointError:
            continue
        complete.append((step if isinstance(step, int) else -1, _natural_key(d.rsplit("/", 1)[-1]), d))
    if not complete:
        return None
    return _url(fs, max(complete)[2])


def resolve_checkpoint(path: str) -> str:
    """The complete checkpoint directory that `path` (a checkpoint or run directory) designates."""
    found = find_latest_checkpoint(path)
    if found is None:
        fs, root = _fs(path)
        what = ("does not exist" if not fs.exists(root)
                else f"holds no complete checkpoint (a directory with {META_FILE})")
        raise CheckpointError(f"checkpoint path {path} {what}")
    return found


def _load_torch(path: str) -> Any:
    fs, p = _fs(path)
    try:
        with fs.open(p, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which one
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(e).__name__}: {e}") from e


def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """Model state dict from a checkpoint directory, a run directory or a state-dict file (.pt/.pth/.bin)."""
    fs, root = _fs(path)
    if fs.isfile(root):
        state = _load_torch(path)
    else:
        state = _load_torch(_join(resolve_checkpoint(path), MODEL_FILE))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a model state dict")
    return _clean_model_state(state)


def load_meta(path: str) -> dict[str, Any]:
    """meta.json of the checkpoint that `path` (a checkpoint or run directory) designates."""
    fs, root = _fs(resolve_checkpoint(path))
    return _read_meta(fs, root)


def _load_optional(path: str, name: str) -> Any | None:
    directory = resolve_checkpoint(path)
    fs, root = _fs(directory)
    file = _join(root, name)
    return _load_torch(_url(fs, file)) if fs.exists(file) else None


def load_optimizer_state(path: str) -> dict | None:
    """optimizer.pt of the checkpoint `path` designates, or None if it was saved without one."""
    return _load_optional(path, OPTIMIZER_FILE)


def load_extra(path: str) -> dict | None:
    """extra.pt of the checkpoint `path` designates, or None if it was saved without one."""
    return _load_optional(path, EXTRA_FILE)
