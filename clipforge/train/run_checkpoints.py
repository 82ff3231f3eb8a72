"""Training checkpoints in STORAGE/checkpoints: when they are named what, pruning, checking, resuming.

A checkpoint written at an epoch boundary is `epoch_NNNN` (NNNN epochs done); one written part-way
through an epoch (`checkpoint.every_steps`, or a step budget ending mid-epoch) is `step_NNNNNNNN`.
The format itself (files, meta.json written last, file digests) belongs to `clipforge.models.checkpoint_files`;
meta.json here also holds the step counters, the data position, the spec and the last metrics line.

A checkpoint is damaged when a file is cut short, differs from the digest meta.json records for it, or
holds non-finite model weights; a resume passes over damaged ones to the newest whole one. Checking
digests reads the files in full, so a resume checks newest-first and stops at the first whole one, and
pruning does not re-read the checkpoints this process wrote or already checked in full (see `prune`).
"""
from __future__ import annotations

import logging
import re
import time
import zipfile
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clipforge.errors import UserError
from clipforge.models.checkpoint_files import (
    EXTRA_FILE,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    check_file,
    find_latest_checkpoint,
    first_nonfinite,
    load_extra,
    load_meta,
    load_model_state,
    load_optimizer_state,
    recorded_files,
    save_checkpoint,
)
from clipforge.runtime.fs_files import join
from clipforge.runtime.run_dir import CHECKPOINTS_DIR
from clipforge.train.spec import TrainSpec

log = logging.getLogger(__name__)


class HasStateDict(Protocol):
    """What a checkpoint is written from: a module, an optimizer, or a state already gathered."""

    def state_dict(self) -> dict[str, Any]: ...


class LoadsStateDict(Protocol):
    """What a checkpoint's optimizer state is restored into."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> object: ...


EPOCH_PREFIX = "epoch_"
STEP_PREFIX = "step_"
PREFIXES = (EPOCH_PREFIX, STEP_PREFIX)


# Checkpoints this process knows to be whole: the ones it wrote (digests computed from the bytes written,
# weights checked finite in memory) and the ones it verified in full, each with the `files` record meta.json
# held then (None: written before digests were recorded). `prune` runs after every save and would otherwise
# read every kept checkpoint in full each time; for these it repeats only the cheap checks (sizes, zip
# directories). A resume never relies on this: `latest_valid` always reads.
_known_whole: dict[str, dict | None] = {}


class ExistingRunError(UserError, ValueError):
    """A fresh run was asked for in a run directory that already holds checkpoints."""


def checkpoint_root(spec: TrainSpec) -> str:
    return join(spec.storage, CHECKPOINTS_DIR)


def checkpoint_name(epoch: int, step: int, step_in_epoch: int) -> str:
    """`epoch_NNNN` at an epoch boundary, else `step_NNNNNNNN`."""
    return f"{EPOCH_PREFIX}{epoch:04d}" if step_in_epoch == 0 else f"{STEP_PREFIX}{step:08d}"


def latest(ckpt_root: str) -> str | None:
    """The newest complete checkpoint (with meta.json) under `ckpt_root`; incomplete directories are ignored."""
    fs, root = fsspec.core.url_to_fs(ckpt_root)
    fs.invalidate_cache()
    if not fs.isdir(root):
        return None
    return find_latest_checkpoint(ckpt_root)


def _zip_problem(fs, path: str) -> str | None:
    """Why a torch.save file cannot be whole (None when its zip directory is intact and within the file).

    A file cut short loses the zip directory at its end, so this catches truncation by reading only
    the file's tail, not its data.
    """
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"member {info.filename} extends past the end of the file"
    except FileNotFoundError:
        return "missing"
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return f"not a complete torch file ({type(e).__name__}: {e})"
    return None


def _structure_problem(fs, root: str, records: dict | None) -> str | None:
    """What the cheap checks find wrong with the checkpoint's files (zip directories, sizes); reads no data."""
    if records is None:  # written before digests were recorded: the files present are the checkpoint
        names = [MODEL_FILE] + [n for n in (OPTIMIZER_FILE, EXTRA_FILE) if fs.exists(f"{root}/{n}")]
    else:
        names = list(records)
    for name in names:
        file = f"{root}/{name}"
        problem = _zip_problem(fs, file)
        if problem:
            return f"{name}: {problem}"
        if records is not None and (size := fs.size(file)) != records[name]["bytes"]:
            return f"{name}: {size} bytes, but {META_FILE} records {records[name]['bytes']}"
    return None


def _content_problem(path: str, records: dict | None) -> str | None:
    """What reading the files finds wrong: digests that differ from meta.json's, model weights that are not
    finite. Each file is read once; only the model is deserialised."""
    try:
        load_model_state(path)
        for name in (records or {}):
            if name != MODEL_FILE:
                check_file(path, name)
    except CheckpointError as e:
        return str(e)
    return None


def verify(path: str) -> str | None:
    """What is wrong with the checkpoint at `path` (None if it is whole): meta.json parses, every file is a complete
    torch file matching the digest meta.json records for it, the model weights are finite. Checkpoints written
    before digests were recorded get the same checks bar the digests.

    This reads the checkpoint in full (once): check newest-first and stop at the first whole one.
    """
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    try:
        records = recorded_files(path)
    except CheckpointError as e:
        return str(e)
    problem = _structure_problem(fs, root, records) or _content_problem(path, records)
    if problem is None:
        _known_whole[path] = records
    else:
        _known_whole.pop(path, None)
    return problem


def _whole_for_pruning(path: str) -> bool:
    """Whether `path` is whole, for `prune`: a checkpoint this process wrote or verified, whose meta.json still
    records the same files, gets the cheap checks only; any other is verified in full."""
    try:
        records = recorded_files(path)
    except CheckpointError:
        return False
    if path not in _known_whole or _known_whole[path] != records:
        return verify(path) is None
    fs, root = fsspec.core.url_to_fs(path)
    return _structure_problem(fs, root.rstrip("/"), records) is None


def complete(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints with a meta.json under `ckpt_root`, oldest first.

    Order: the step in meta.json, then the directory name (natural order).
    """
    fs, root = fsspec.core.url_to_fs(ckpt_root)
    fs.invalidate_cache()
    if not fs.isdir(root):
        return []
    found = []
    for entry in fs.ls(root, detail=True):
        path = entry["name"].rstrip("/")
        name = path.rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or not name.startswith(PREFIXES):
            continue
        if not fs.exists(f"{path}/{META_FILE}"):
            continue
        try:
            step = load_meta(_url(fs, path)).get("step")
        except CheckpointError:
            step = None
        found.append((step if isinstance(step, int) else -1, _natural_key(name), _url(fs, path)))
    return [(step, path) for step, _, path in sorted(found)]


def _url(fs, path: str) -> str:
    """A path that can be passed back in: plain for local files, with its protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def latest_valid(ckpt_root: str) -> str | None:
    """The newest whole checkpoint (see `verify`); damaged newer ones (files cut short or differing from their
    digests, non-finite weights) are skipped with a warning. Only the checkpoints down to the first whole one
    are read."""
    for _, path in reversed(complete(ckpt_root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); trying the one before it", path, problem)
    return None


def resume_point(spec: TrainSpec) -> str | None:
    return latest_valid(checkpoint_root(spec)) if spec.resume else None


def refuse_existing(spec: TrainSpec) -> None:
    """With `resume: false`, a run directory with checkpoints is an error (they would be mixed with the new run's)."""
    if spec.resume:
        return
    found = latest(checkpoint_root(spec))
    if found:
        raise ExistingRunError(
            f"storage {spec.storage} already holds checkpoint {found}; set `resume: true` to continue that run "
            "or choose a new storage folder"
        )


def save(spec: TrainSpec, model: HasStateDict, model_name: str, optimizer: HasStateDict,
         schedule, progress, extra_meta: dict | None = None, scaler=None) -> str:
    """Write the unwrapped model (all weights, frozen towers included) plus what resuming needs; prune old ones.

    `extra_meta` (JSON data: data position, metrics, counters) is merged into meta.json; `scaler` is a
    gradient scaler (anything with state_dict) whose state is saved beside the scheduler's.
    """
    meta = {
        "step": progress.step,
        "epoch": progress.epoch,
        "samples_seen": progress.samples_seen,
        "loss": progress.last_loss,
        "model_name": model_name,
        "trainable": spec.model.model_dump(mode="json")["trainable"],
        "time": time.time(),
        "spec": spec.model_dump(mode="json"),
        **(extra_meta or {}),
    }
    extra = {"scheduler": schedule.state_dict()}
    if scaler is not None:
        extra["grad_scaler"] = scaler.state_dict()
    name = checkpoint_name(progress.epoch, progress.step, meta.get("step_in_epoch", 0))
    model_state = model.state_dict()
    path = save_checkpoint(join(checkpoint_root(spec), name), model_state, meta,
                           optimizer_state=optimizer.state_dict(), extra=extra)
    _remember_written(path, model_state)
    prune(checkpoint_root(spec), spec.checkpoint.keep_last)
    log.info("saved checkpoint %s", path)
    return path


def _remember_written(path: str, model_state: dict) -> None:
    """Note a checkpoint just written as whole for `prune`, unless its weights are not finite (a resume will pass
    over it: say so now)."""
    bad = first_nonfinite(model_state)
    if bad is not None:
        _known_whole.pop(path, None)
        log.warning("checkpoint %s holds non-finite weights (tensor %s): a resume will pass over it", path, bad)
        return
    _known_whole[path] = recorded_files(path)


def prune(ckpt_root: str, keep_last: int) -> list[str]:
    """Keep the newest `keep_last` whole checkpoints; delete older ones, and damaged ones older than the newest
    whole one (they can never be resumed from). Returns what was deleted, oldest first.

    Checked newest-first: once `keep_last` whole ones are found, the older ones are deleted without being read;
    the checkpoints this process wrote or verified get the cheap checks only (see `_known_whole`).
    Directories without meta.json are left alone: they are not checkpoints, and may be in use.
    """
    fs, _ = fsspec.core.url_to_fs(ckpt_root)
    doomed, whole = [], 0
    for _, path in reversed(complete(ckpt_root)):
        if whole >= keep_last:
            doomed.append(path)
        elif _whole_for_pruning(path):
            whole += 1
        elif whole:  # damaged, and older than a whole one
            doomed.append(path)
    doomed.reverse()
    for path in doomed:
        _, p = fsspec.core.url_to_fs(path)
        _known_whole.pop(path, None)
        # meta.json first, so a deletion cut short leaves an incomplete directory, never a broken "complete" one.
        fs.rm(f"{p}/{META_FILE}")
        fs.rm(p, recursive=True)
    return doomed


def resume_state(path: str) -> dict:
    """meta.json of the checkpoint, for the step/epoch/sample counters and the data position."""
    return load_meta(path)


def restore_training_state(path: str, optimizer: LoadsStateDict, schedule, scaler=None) -> None:
    """Optimizer moments, the schedule position and the gradient scaler; the optimizer must be built over the
    same parameters in the same order."""
    opt_state = load_optimizer_state(path)
    if opt_state is None:
        log.warning("checkpoint %s has no optimizer state; resuming with fresh AdamW moments", path)
    else:
        optimizer.load_state_dict(opt_state)
    extra = load_extra(path) or {}
    if "scheduler" in extra:
        schedule.load_state_dict(extra["scheduler"])
    else:
        schedule.load_state_dict({"step": load_meta(path).get("step", 0)})
    if scaler is not None and "grad_scaler" in extra:
        scaler.load_state_dict(extra["grad_scaler"])
