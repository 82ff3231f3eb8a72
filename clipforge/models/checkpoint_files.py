"""The project's checkpoint format, on any fsspec filesystem (local paths, s3://, memory://, ...).

A checkpoint is a directory:
    model.pt       state dict of the CLIP model (open_clip-loadable: `open_clip.create_model(name, pretrained=...)`)
    optimizer.pt   optimizer state (optional)
    extra.pt       anything else a trainer needs to resume: scheduler, step counters (optional; tensors
                   and plain Python data only, as all files are read with torch.load(weights_only=True))
    meta.json      written last: its presence marks the checkpoint complete; besides the caller's meta it
                   records `files`: {name: {"sha256": hex digest, "bytes": size}} for every file written
With the model spec the weights were built from (given, or in meta's `spec.model` as a training run's meta holds
it), the directory is also an open_clip folder: open_clip_config.json, open_clip_pytorch_model.bin (a hard link to
model.pt) and, for Hugging Face text towers, the tower's config and tokenizer files, so that
`open_clip.create_model_and_transforms('local-dir:DIR')` gives the same model and image transform
(clipforge.models.open_clip_folder). clipforge itself never reads those files and `files` does not list them.
A run directory keeps its checkpoints in `checkpoints/<name>` (e.g. step_000120, epoch_0003).

Every load reads a file once, checks it against its recorded digest and then deserialises the bytes in
memory, so a file changed after it was written (a bad disk, a partial overwrite) is refused instead of
turning into garbage weights. Checkpoints written before digests were recorded (no `files`) load as
before. Loaded model weights must be finite, with or without digests: a diverged run's weights are
refused too.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from typing import IO, TYPE_CHECKING, Any, cast

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from clipforge.models.errors import CheckpointError
from clipforge.runtime.run_dir import CHECKPOINTS_DIR

if TYPE_CHECKING:
    from clipforge.models.spec import ModelSpec

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
EXTRA_FILE = "extra.pt"
META_FILE = "meta.json"
FILES_KEY = "files"  # meta.json's record of the files written: {name: {"sha256": ..., "bytes": ...}}
_HASH_CHUNK = 8 << 20  # bytes read at a time when a file is only hashed, not loaded


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


class _DigestingWriter:
    """Passes torch.save's output through to `file`, hashing and counting it on the way, so a checkpoint file's
    digest is known once it is written without reading it back (a second full transfer on object stores)."""

    def __init__(self, file):
        self._file = file
        self._sha256 = hashlib.sha256()
        self._bytes = 0

    def write(self, data) -> int:
        self._sha256.update(data)
        self._bytes += memoryview(data).nbytes
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def record(self) -> dict[str, Any]:
        return {"sha256": self._sha256.hexdigest(), "bytes": self._bytes}


def _save_torch(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> dict[str, Any]:
    """Write `obj` with torch.save; returns the file's meta.json record (digest and size)."""
    with fs.open(path, "wb") as f:
        writer = _DigestingWriter(f)
        # torch.save writes to any object with write() and flush(); its annotation names only real files.
        torch.save(obj, cast(IO[bytes], writer))
    return writer.record()


def save_checkpoint(directory: str, model_state: dict, meta: dict, optimizer_state: dict | None = None,
                    extra: dict | None = None, model_spec: ModelSpec | None = None) -> str:
    """Write a checkpoint directory (meta.json last, with the digest of every file written) and return its path.

    A `files` entry in `meta` (e.g. a meta copied from another checkpoint) is replaced by this one's. `model_spec`
    (default: meta's `spec.model`, where meta holds a spec) is the model the weights belong to: the directory is
    then written as an open_clip folder too.
    """
    try:
        json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"checkpoint meta for {directory} must be JSON-serialisable: {e}") from e
    fs, root = _fs(directory)
    fs.makedirs(root, exist_ok=True)
    meta_path = _join(root, META_FILE)
    if fs.exists(meta_path):
        # Rewriting a directory: it is incomplete until the new meta.json lands.
        fs.rm(meta_path)
    files = {MODEL_FILE: _save_torch(fs, _join(root, MODEL_FILE), _clean_model_state(model_state))}
    if optimizer_state is not None:
        files[OPTIMIZER_FILE] = _save_torch(fs, _join(root, OPTIMIZER_FILE), optimizer_state)
    if extra is not None:
        files[EXTRA_FILE] = _save_torch(fs, _join(root, EXTRA_FILE), extra)
    _write_open_clip_files(fs, root, meta, model_spec)
    tmp = _join(root, META_FILE + ".tmp")
    with fs.open(tmp, "w") as f:
        f.write(json.dumps({**meta, FILES_KEY: files}, indent=2, sort_keys=True))
    fs.mv(tmp, meta_path)
    return _url(fs, root)


def _write_open_clip_files(fs: fsspec.AbstractFileSystem, root: str, meta: dict,
                           model_spec: ModelSpec | None) -> None:
    from clipforge.models.open_clip_folder import model_spec_of, try_write_open_clip_files

    spec = model_spec or model_spec_of(meta)
    if spec is not None:
        try_write_open_clip_files(fs, root, MODEL_FILE, spec)


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


def _file_records(fs: fsspec.AbstractFileSystem, checkpoint_dir: str,
                  meta: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """meta.json's `files` record, checked for shape; None for a checkpoint written before files were recorded."""
    files = meta.get(FILES_KEY)
    if files is None:
        return None
    where = f"checkpoint metadata {_url(fs, _join(checkpoint_dir, META_FILE))}"
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: `{FILES_KEY}` must map file names to their sha256 and size")
    for name, record in files.items():
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
                and isinstance(record.get("bytes"), int)):
            raise CheckpointError(f"{where}: `{FILES_KEY}.{name}` must hold `sha256` (hex) and `bytes` (int)")
    return files


def recorded_files(path: str) -> dict[str, dict[str, Any]] | None:
    """{file name: {"sha256", "bytes"}} that the checkpoint `path` designates records for its files; None for a
    checkpoint written before digests were recorded."""
    fs, root = _fs(resolve_checkpoint(path))
    return _file_records(fs, root, _read_meta(fs, root))


def _digest_mismatch(url: str, record: dict[str, Any], found_sha256: str, found_bytes: int) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {url} does not match its checksum: {META_FILE} records sha256 {record['sha256']} "
        f"({record['bytes']} bytes), the file has sha256 {found_sha256} ({found_bytes} bytes); it was changed "
        "or damaged after it was written: use an earlier checkpoint"
    )


def _read_bytes(fs: fsspec.AbstractFileSystem, path: str, record: dict[str, Any] | None) -> bytes:
    """The whole file, read once and checked against its record (when there is one)."""
    url = _url(fs, path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {url}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {url}: {type(e).__name__}: {e}") from e
    if record is not None:
        found = hashlib.sha256(data).hexdigest()
        if found != record["sha256"] or len(data) != record["bytes"]:
            raise _digest_mismatch(url, record, found, len(data))
    return data


def _load_torch(fs: fsspec.AbstractFileSystem, path: str, record: dict[str, Any] | None = None) -> Any:
    """torch.load of a file whose bytes were read once and checked (one read: not one to hash, one to load)."""
    data = _read_bytes(fs, path, record)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which one
        raise CheckpointError(f"cannot read checkpoint file {_url(fs, path)}: {type(e).__name__}: {e}") from e


def _load_checkpoint_file(checkpoint_dir: str, name: str) -> Any | None:
    """File `name` of a complete checkpoint directory, checked against its digest; None if the checkpoint has no
    such file. With recorded digests the record is authoritative: a file it does not list is a leftover of an
    earlier write into the same directory, not part of this checkpoint."""
    fs, root = _fs(checkpoint_dir)
    records = _file_records(fs, root, _read_meta(fs, root))
    path = _join(root, name)
    if records is None:
        return _load_torch(fs, path) if name == MODEL_FILE or fs.exists(path) else None
    if name not in records:
        if name == MODEL_FILE:
            raise CheckpointError(f"checkpoint {_url(fs, root)}: {META_FILE} lists no {MODEL_FILE}")
        return None
    return _load_torch(fs, path, records[name])


def first_nonfinite(state: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor in `state` holding NaN or infinity; None if all are finite."""
    for name, value in state.items():
        if (isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
                and not bool(torch.isfinite(value).all())):
            return name
    return None


def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """Model state dict from a checkpoint directory, a run directory or a state-dict file (.pt/.pth/.bin).

    Checkpoint files are checked against their recorded digest; the weights must be finite (a standalone
    state-dict file has no digest: it gets the finiteness check only).
    """
    fs, root = _fs(path)
    if fs.isfile(root):
        file = path
        state = _load_torch(fs, root)
    else:
        directory = resolve_checkpoint(path)
        file = _join(directory, MODEL_FILE)
        state = _load_checkpoint_file(directory, MODEL_FILE)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a model state dict")
    state = _clean_model_state(state)
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"model weights in {file} are not finite: tensor {bad} holds NaN or infinity "
                              "(written by a run that diverged, or damaged); use an earlier checkpoint")
    return state


def check_file(path: str, name: str) -> None:
    """Raise CheckpointError if file `name` of the checkpoint `path` designates differs from its recorded digest
    (hashed in chunks, not loaded); nothing to check for a file without a record."""
    directory = resolve_checkpoint(path)
    fs, root = _fs(directory)
    record = (_file_records(fs, root, _read_meta(fs, root)) or {}).get(name)
    if record is None:
        return
    file = _join(root, name)
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open(file, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {_url(fs, file)}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {_url(fs, file)}: {type(e).__name__}: {e}") from e
    if digest.hexdigest() != record["sha256"] or size != record["bytes"]:
        raise _digest_mismatch(_url(fs, file), record, digest.hexdigest(), size)


def load_meta(path: str) -> dict[str, Any]:
    """meta.json of the checkpoint that `path` (a checkpoint or run directory) designates: the meta it was saved
    with (the format's own `files` record is left out; see `recorded_files`)."""
    fs, root = _fs(resolve_checkpoint(path))
    meta = _read_meta(fs, root)
    meta.pop(FILES_KEY, None)
    return meta


def load_optimizer_state(path: str) -> dict | None:
    """optimizer.pt of the checkpoint `path` designates, or None if it was saved without one."""
    return _load_checkpoint_file(resolve_checkpoint(path), OPTIMIZER_FILE)


def load_extra(path: str) -> dict | None:
    """extra.pt of the checkpoint `path` designates, or None if it was saved without one."""
    return _load_checkpoint_file(resolve_checkpoint(path), EXTRA_FILE)
