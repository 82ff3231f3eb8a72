"""Training checkpoints in STORAGE/checkpoints/epoch_NNNN: saving, pruning, and what resuming needs.

The format itself (files, meta.json written last) belongs to `clipforge.models.checkpoint`; this
module decides when and where to write, which ones to keep, and how a run picks up again.
"""
from __future__ import annotations

import logging
import time

import fsspec
import torch

from clipforge.models.checkpoint import (
    META_FILE,
    find_latest_checkpoint,
    load_extra,
    load_meta,
    load_optimizer_state,
    save_checkpoint,
)
from clipforge.train.spec import TrainSpec
from clipforge.train.storage import join

log = logging.getLogger(__name__)

PREFIX = "epoch_"


class ExistingRunError(ValueError):
    """A fresh run was asked for in a run directory that already holds checkpoints."""


def checkpoint_root(spec: TrainSpec) -> str:
    return join(spec.storage, "checkpoints")


def latest(ckpt_root: str) -> str | None:
    """The newest complete checkpoint (with meta.json) under `ckpt_root`; incomplete directories are ignored."""
    fs, root = fsspec.core.url_to_fs(ckpt_root)
    if not fs.isdir(root):
        return None
    return find_latest_checkpoint(ckpt_root)


def resume_point(spec: TrainSpec) -> str | None:
    return latest(checkpoint_root(spec)) if spec.resume else None


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


def save(spec: TrainSpec, model: torch.nn.Module, model_name: str, optimizer: torch.optim.Optimizer,
         schedule, progress) -> str:
    """Write the unwrapped model (all weights, frozen towers included) plus what resuming needs; prune old ones."""
    meta = {
        "step": progress.step,
        "epoch": progress.epoch,
        "samples_seen": progress.samples_seen,
        "loss": progress.last_loss,
        "model_name": model_name,
        "trainable": spec.model.model_dump(mode="json")["trainable"],
        "time": time.time(),
        "spec": spec.model_dump(mode="json"),
    }
    directory = join(checkpoint_root(spec), f"{PREFIX}{progress.epoch:04d}")
    path = save_checkpoint(
        directory,
        model.state_dict(),
        meta,
        optimizer_state=optimizer.state_dict(),
        extra={"scheduler": schedule.state_dict()},
    )
    prune(checkpoint_root(spec), spec.checkpoint.keep_last)
    log.info("saved checkpoint %s", path)
    return path


def _complete(ckpt_root: str) -> list[tuple[int, str]]:
    """(epoch, path) of the complete epoch checkpoints, oldest first."""
    fs, root = fsspec.core.url_to_fs(ckpt_root)
    found = []
    for entry in fs.ls(root, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
            continue
        if fs.exists(f"{entry['name'].rstrip('/')}/{META_FILE}"):
            found.append((int(name[len(PREFIX):]), entry["name"].rstrip("/")))
    return sorted(found)


def prune(ckpt_root: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was deleted.

    Directories without meta.json are left alone: they are not checkpoints, and may be in use.
    """
    fs, _ = fsspec.core.url_to_fs(ckpt_root)
    complete = _complete(ckpt_root)
    doomed = [path for _, path in complete[:-keep_last]] if len(complete) > keep_last else []
    for path in doomed:
        # meta.json first, so a deletion cut short leaves an incomplete directory, never a broken "complete" one.
        fs.rm(f"{path}/{META_FILE}")
        fs.rm(path, recursive=True)
    return doomed


def resume_state(path: str) -> dict:
    """meta.json of the checkpoint, for the step/epoch/sample counters."""
    return load_meta(path)


def restore_training_state(path: str, optimizer: torch.optim.Optimizer, schedule) -> None:
    """Optimizer moments and the schedule position; the optimizer must be built over the same parameters."""
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
