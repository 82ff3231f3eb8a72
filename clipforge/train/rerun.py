"""Running a train spec again into a run directory that already holds checkpoints, decided before Ray starts.

A run directory remembers the spec that trained it: STORAGE/spec_history.jsonl (one line per spec, where each
began), else, for run directories written before that file, the spec in its newest checkpoint's meta.json,
else spec.yaml. A re-run whose spec differs from that one in a field its checkpoints depend on is refused
(`RunSpecChanged`, nothing written) unless the command says what to do:
  --resume  accept the change and continue from the newest checkpoint (a new line of the spec history);
  --fresh   train from scratch into a new sibling folder (STORAGE-2, STORAGE-3, ...); the old one is kept as is.
Fields that change neither the weights nor the data they are trained on may differ freely (`MAY_CHANGE`):
the budget (a larger one trains on; recorded in the history too), logging, checkpoint and evaluation cadence,
and where and how the work is placed. A run whose newest checkpoint already holds the whole budget has nothing
to train: `AlreadyTrained`, without a file written.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
from pydantic import ValidationError

from clipforge.errors import EXIT_INVALID, UserError
from clipforge.runtime.fs_files import join
from clipforge.runtime.run_dir import (
    CHECKPOINTS_DIR,
    SPEC_FILE,
    SPEC_HISTORY_FILE,
    append_spec_history,
    read_spec,
    read_spec_history,
    read_summary,
    summary_path,
)
from clipforge.runtime.storage_errors import storage_errors
from clipforge.train import budget, run_checkpoints
from clipforge.train.spec import TrainSpec

log = logging.getLogger(__name__)

RerunMode = Literal["check", "resume", "fresh"]
RERUN_MODES: tuple[RerunMode, ...] = ("check", "resume", "fresh")

BUDGET_FIELDS = ("optim.epochs", "optim.steps", "optim.samples")

# The fields (or whole sections) a re-run may change without --resume or --fresh, each with why: none of them
# changes which weights training produces from which data, so the checkpoints stay the run's own.
MAY_CHANGE: dict[str, str] = {
    **{name: "the budget: a resume trains on to the new length (and a smaller one may already be done)"
       for name in BUDGET_FIELDS},
    "log_every_steps": "logging cadence",
    "tensorboard": "a copy of the metrics as TensorBoard events",
    "debug": "diagnostics written beside the run",
    "checkpoint": "when checkpoints are written and how many are kept",
    "eval_every_steps": "evaluation during training reads the weights, it never changes them",
    "eval_tasks": "evaluation during training reads the weights, it never changes them",
    "eval_batch_size": "evaluation during training reads the weights, it never changes them",
    "storage": "where the run directory is: a moved or copied run directory resumes as it is",
    "overwrite": "whether the folder may hold others' files; decided by the folder check",
    "resume": "`resume: false` is refused in a folder with checkpoints by its own check",
    "max_failures": "how often failed workers are restarted",
    "ray": "which Ray cluster runs the job and its environment",
    # Not scaling.workers: the ranks split each epoch's samples, so their number changes the data order.
    "scaling.cpus_per_worker": "what each worker reserves",
    "scaling.gpus_per_worker": "what each worker reserves",
    "scaling.resources": "what each worker reserves",
    "scaling.placement_timeout_s": "how long the run waits for its workers",
    "data.loader_workers": "DataLoader processes per worker: speed only",
    # Checkpoints hold the whole unsharded model and optimizer state, which every strategy resumes (a deepspeed
    # config of its own may set batch sizes or precision, so parallel.deepspeed_config is not listed).
    "strategy": "how the model is laid out over the workers",
    "parallel.fsdp_cpu_offload": "how the model is laid out over the workers",
    "parallel.fsdp_reshard_after_forward": "how the model is laid out over the workers",
    "parallel.zero_stage": "how the model is laid out over the workers",
    "parallel.offload_optimizer": "how the model is laid out over the workers",
}

_SHOWN_CHARS = 80  # of a value in a change line


class RunSpecChanged(UserError, ValueError):
    """A re-run's spec differs from the one that trained the run directory's checkpoints; nothing was written."""

    exit_code = EXIT_INVALID


class RerunOptionError(UserError, ValueError):
    """--resume or --fresh given where it cannot apply."""

    exit_code = EXIT_INVALID


class AlreadyTrained(dict):
    """The recorded summary of a run whose newest checkpoint already holds the whole budget (nothing was
    trained or written); `message` says so in one line."""

    nothing_trained = True  # how the command line tells it from a summary without importing this module

    def __init__(self, summary: dict, message: str):
        super().__init__(summary)
        self.message = message


@dataclass(frozen=True)
class Change:
    """One field whose value differs between the recorded spec and the new one."""

    field: str
    recorded: Any
    new: Any

    def line(self) -> str:
        return f"{self.field}: {_shown(self.recorded)} -> {_shown(self.new)}"


def _shown(value: Any) -> str:
    text = "(not set)" if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


_ABSENT = object()  # a key one of the two specs does not have


def spec_changes(recorded: Any, new: Any, prefix: str = "") -> list[Change]:
    """Every field whose value differs, as dotted paths into the two specs (plain data, as specs dump); mappings
    are compared key by key, anything else (lists included) as one value."""
    if isinstance(recorded, dict) and isinstance(new, dict):
        changes = []
        for key in [*recorded, *(k for k in new if k not in recorded)]:
            path = f"{prefix}.{key}" if prefix else str(key)
            changes += spec_changes(recorded.get(key, _ABSENT), new.get(key, _ABSENT), path)
        return changes
    return [] if recorded == new else [Change(prefix, recorded, new)]


def may_change(field: str) -> bool:
    """Whether a re-run may change `field` without --resume (see MAY_CHANGE)."""
    return any(field == name or field.startswith(name + ".") for name in MAY_CHANGE)


def binding_changes(recorded: dict, new: dict) -> list[Change]:
    """The changes between two specs that need --resume or --fresh."""
    return [c for c in spec_changes(normalised(recorded), normalised(new)) if not may_change(c.field)]


def normalised(spec_fields: dict) -> dict:
    """A spec as plain data with every default filled in, so that one recorded by an older clipforge (without
    fields added since) compares equal where it set nothing; a record that no longer validates is taken as is."""
    try:
        return TrainSpec.model_validate(spec_fields).model_dump(mode="json")
    except ValidationError:
        return spec_fields


# -- what the run directory holds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunState:
    """A run directory with at least one complete checkpoint."""

    checkpoint: str  # the newest complete checkpoint
    meta: dict  # its meta.json
    recorded_spec: dict | None  # the spec it was trained under (None: the run directory does not say)
    recorded_in: str  # where that spec was read, for messages


def run_state(storage: str) -> RunState | None:
    """What STORAGE holds, or None when it has no complete checkpoint (a fresh run)."""
    newest = run_checkpoints.latest(join(storage, CHECKPOINTS_DIR))
    if newest is None:
        return None
    meta = run_checkpoints.resume_state(newest)
    history = read_spec_history(storage)
    if history and isinstance(history[-1].get("spec"), dict):
        return RunState(newest, meta, history[-1]["spec"], join(storage, SPEC_HISTORY_FILE))
    # Run directories written before the history: the checkpoint's own record is the truth (spec.yaml was
    # rewritten by every start, also by re-runs that trained nothing).
    if isinstance(meta.get("spec"), dict):
        return RunState(newest, meta, meta["spec"], f"{newest}/meta.json")
    return RunState(newest, meta, read_spec(storage), join(storage, SPEC_FILE))


def _holds_budget(spec: TrainSpec, meta: dict) -> bool:
    known_total = budget.total_steps(spec.optim, 0, spec.data.batch_size)  # all but epoch budgets
    return budget.finished(spec.optim, int(meta.get("epoch", 0)), int(meta.get("step", 0)), known_total)


def _budget(spec: TrainSpec) -> tuple[str, int | None]:
    """The budget field the spec sets, and its value."""
    optim = spec.optim
    if optim.steps is not None:
        return "optim.steps", optim.steps
    if optim.samples is not None:
        return "optim.samples", optim.samples
    return "optim.epochs", optim.epochs


def _already_trained(spec: TrainSpec, state: RunState) -> AlreadyTrained:
    meta = state.meta
    field, value = _budget(spec)
    message = (f"{spec.storage} already holds its whole budget of {budget.describe(spec.optim)} (newest checkpoint "
               f"{state.checkpoint}: step {meta.get('step', 0)}, epoch {meta.get('epoch', 0)}); nothing to train, no "
               f"file changed. To train more, raise {field} above {value}")
    return AlreadyTrained(_recorded_summary(spec.storage, state), message)


def _recorded_summary(storage: str, state: RunState) -> dict:
    """summary.json as the last run wrote it, else what the checkpoint records (a run cut off before its end)."""
    fs, p = fsspec.core.url_to_fs(summary_path(storage))
    if fs.exists(p):
        return read_summary(storage)
    meta = state.meta
    return {"steps": meta.get("step", 0), "epochs": meta.get("epoch", 0), "samples_seen": meta.get("samples_seen"),
            "final_loss": meta.get("loss"), "checkpoint": state.checkpoint}


# -- the decision -------------------------------------------------------------------------------------------


def _refusal(spec: TrainSpec, state: RunState, changes: list[Change], fresh_into: str) -> RunSpecChanged:
    listed = "; ".join(c.line() for c in changes)
    return RunSpecChanged(
        f"{spec.storage} holds checkpoints (newest {state.checkpoint}, step {state.meta.get('step', 0)}) trained "
        f"under another spec (recorded in {state.recorded_in}), which this one changes: {listed}. Run again with "
        f"--resume to continue those checkpoints under the new spec (recorded in {SPEC_HISTORY_FILE}), or with "
        f"--fresh to train from scratch into {fresh_into} (the old run directory is kept as it is)"
    )


def fresh_folder(storage: str) -> str:
    """The first of STORAGE-2, STORAGE-3, ... that does not exist yet (or is an empty folder)."""
    fs, root = fsspec.core.url_to_fs(storage)
    base = storage.rstrip("/")
    root = root.rstrip("/")
    fs.invalidate_cache()
    number = 2
    while fs.exists(f"{root}-{number}") and (not fs.isdir(f"{root}-{number}") or fs.ls(f"{root}-{number}")):
        number += 1
    return f"{base}-{number}"


def plan_rerun(spec: TrainSpec, mode: RerunMode = "check") -> TrainSpec | AlreadyTrained:
    """The spec to train (the same; with --fresh in a folder with checkpoints, one with a new storage folder), or
    AlreadyTrained when there is nothing to train. Raises RunSpecChanged when the run directory's checkpoints were
    trained under a spec this one changes and `mode` does not say what to do. Writes nothing.

    `spec` has absolute paths (as the trainer sends workers and records), so that it compares with the record.
    """
    if mode not in RERUN_MODES:
        raise ValueError(f"rerun mode {mode!r}: expected one of {', '.join(RERUN_MODES)}")
    if mode == "resume" and not spec.resume:
        raise RerunOptionError("--resume continues the run directory's checkpoints, but the spec sets "
                               "`resume: false`: leave out one of the two")
    with storage_errors("storage", spec.storage):
        state = run_state(spec.storage)
        if state is None or (not spec.resume and mode != "fresh"):
            return spec  # a fresh run, or `resume: false`, which refuses a folder with checkpoints by itself
        if mode == "fresh":
            into = fresh_folder(spec.storage)
            log.info("--fresh: %s holds a run already (kept as it is); training from scratch into %s",
                     spec.storage, into)
            return spec.model_copy(update={"storage": into})
        changes = binding_changes(state.recorded_spec, spec.model_dump(mode="json")) if state.recorded_spec else []
        if changes and mode == "check":
            raise _refusal(spec, state, changes, fresh_folder(spec.storage))
    # A damaged newest checkpoint is passed over by the workers, which then train on from the one before it.
    if _holds_budget(spec, state.meta) and run_checkpoints.verify(state.checkpoint) is None:
        return _already_trained(spec, state)
    return spec


# -- the record ---------------------------------------------------------------------------------------------


def record_spec(spec: TrainSpec, start_step: int, resumed_meta: dict) -> None:
    """Add `spec` to the run directory's spec history when it differs from the last spec there: the run now
    trains under it from `start_step`. A run directory written before the history exists gets, first, the spec
    its checkpoint records (from step 0: when earlier changes happened is not known). Called once per attempt by
    rank 0; restarts after failures train under the same spec and add nothing."""
    fields = spec.model_dump(mode="json")
    history = read_spec_history(spec.storage)
    last = history[-1].get("spec") if history else None
    if not history and start_step > 0 and isinstance(resumed_meta.get("spec"), dict):
        last = resumed_meta["spec"]
        append_spec_history(spec.storage, {"start_step": 0, "time": None, "changed": [], "spec": last})
    if isinstance(last, dict) and normalised(last) == fields:
        return
    changed = [c.line() for c in spec_changes(normalised(last), fields)] if isinstance(last, dict) else []
    append_spec_history(spec.storage, {"start_step": start_step, "time": time.time(), "changed": changed,
                                       "spec": fields})
