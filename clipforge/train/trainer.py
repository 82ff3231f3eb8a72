"""`kind: train` on Ray Train: one TorchTrainer fit, our own files in the run directory.

The run directory (`spec.storage`, laid out in clipforge.runtime.run_dir) receives spec.yaml and its index
run.json (at start), metrics.jsonl, checkpoints/, tensorboard/, workers/ (which process is which rank) and
summary.json (at the end). Ray's own experiment state goes to STORAGE/ray for local runs and to a temporary
folder otherwise; nothing there is needed after the run.

When a worker dies, Ray Train restarts the whole worker group (up to `max_failures` times) and the
loop resumes from the latest checkpoint in STORAGE/checkpoints: our checkpoints, not Ray's. A worker
group that Ray cannot place within `scaling.placement_timeout_s`, at the start or at a restart, ends
the run (see clipforge.train.placement).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

from clipforge.errors import UserError
from clipforge.models.checkpoint_files import resolve_checkpoint
from clipforge.runtime.fs_files import is_local, join
from clipforge.runtime.output_folder import OutputOwner, claim_output_folder
from clipforge.runtime.ray_session import ray_session
from clipforge.runtime.remote_env import forwarded_env
from clipforge.runtime.run_dir import (
    RAY_DIR,
    TRAIN_RUN_ENTRIES,
    TRAIN_RUN_SIGNATURE,
    read_summary,
    write_spec_files,
    write_summary,
)
from clipforge.runtime.storage_errors import storage_errors
from clipforge.train.loop import train_loop_per_worker
from clipforge.train.placement import PlacementWatch, placement_failure, placement_timeout
from clipforge.train.progress import MetricsProgress
from clipforge.train.rerun import AlreadyTrained, RerunMode, plan_rerun
from clipforge.train.run_checkpoints import refuse_existing
from clipforge.train.shards import expand_sources
from clipforge.train.spec import TrainSpec

log = logging.getLogger(__name__)


class TrainingFailed(UserError, RuntimeError):
    """A training worker raised; the message is the worker's own error (its traceback is in the worker's log)."""


def worker_resources(spec: TrainSpec) -> dict[str, float]:
    """What each training worker reserves."""
    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources}
    if s.gpus_per_worker > 0:
        resources["GPU"] = s.gpus_per_worker
    return resources


def _scaling_config(spec: TrainSpec):
    from ray.train import ScalingConfig

    s = spec.scaling
    return ScalingConfig(num_workers=s.workers, use_gpu=s.gpus_per_worker > 0,
                         resources_per_worker=worker_resources(spec))


def _failure_config(spec: TrainSpec):
    import ray.train

    # No controller failure is retried: Ray Train would otherwise wait for an unplaceable worker group
    # forever, `scaling.placement_timeout_s` at a time (see clipforge.train.placement).
    # At run time ray.train exports Train v2's FailureConfig (controller_failure_limit); its annotations name v1's.
    return ray.train.FailureConfig(max_failures=spec.max_failures,
                                   controller_failure_limit=0)  # type: ignore[call-arg]


def _fit(trainer, spec: TrainSpec, progress: bool) -> None:
    """`trainer.fit()` with the placement limit handed to Ray Train and the wait for workers logged."""
    s = spec.scaling
    with (placement_timeout(s.placement_timeout_s),
          PlacementWatch(spec.name, s.workers, worker_resources(spec), s.placement_timeout_s),
          MetricsProgress(spec.storage, spec.name) if progress else contextlib.nullcontext()):
        trainer.fit()


def _root_cause(err: BaseException) -> BaseException:
    """The worker exception inside Ray's wrappers (TrainingFailedError -> WorkerGroupError -> RayTaskError), or
    the controller's (ControllerError -> its failure)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        worker_failures = getattr(err, "worker_failures", None)
        if worker_failures:
            err = next(iter(worker_failures.values()))
            continue
        controller_failure = getattr(err, "controller_failure", None)
        if isinstance(controller_failure, BaseException):
            err = controller_failure
            continue
        cause = getattr(err, "cause", None) or err.__cause__
        if cause is None:
            break
        err = cause
    return err


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(spec: TrainSpec) -> TrainSpec:
    """Local paths made absolute on the driver: workers do not share its working directory."""
    model = spec.model
    if model.checkpoint:
        model = model.model_copy(update={"checkpoint": _absolute(model.checkpoint)})
    data = spec.data
    if data.shards is not None:
        data = data.model_copy(update={"shards": [_absolute(s) for s in data.shards]})
    else:
        sources = [s.model_copy(update={"shards": [_absolute(p) for p in s.shards]}) for s in data.source_list()]
        data = data.model_copy(update={"sources": sources})
    tasks = [task.with_absolute_paths() for task in spec.eval_tasks]
    return spec.model_copy(update={"storage": _absolute(spec.storage), "model": model, "data": data,
                                   "eval_tasks": tasks})


def worker_env(spec: TrainSpec) -> dict[str, str]:
    """Environment for the training workers: the job's runtime_env variables and the driver's object-store
    settings (a cluster started earlier does not have them; a submitted job's workers read them themselves)."""
    env = forwarded_env(output_is_local=False)
    env.update({k: str(v) for k, v in (spec.ray.runtime_env.get("env_vars") or {}).items()})
    return env


def output_owner(spec: TrainSpec) -> OutputOwner:
    """This run as the owner of its run directory."""
    return OutputOwner("train", spec.name, "storage", own_names=TRAIN_RUN_ENTRIES, signature=TRAIN_RUN_SIGNATURE)


def run_train(spec: TrainSpec, progress: bool = True, rerun: RerunMode = "check") -> dict:
    """Train as `spec` says; returns the run summary, also written to STORAGE/summary.json.

    `progress`: show a progress bar on stdout while training (only when stdout is a terminal).
    `rerun`: what to do when STORAGE holds checkpoints trained under a spec this one changes (see
    clipforge.train.rerun): refuse (`check`), continue them under this spec (`resume`), or train from scratch
    into a new sibling folder (`fresh`). When they already hold the whole budget, returns `AlreadyTrained` (the
    recorded summary) without starting Ray or writing anything.
    """
    t0 = time.time()
    spec = with_absolute_paths(spec)
    # Before Ray starts and before anything is written: a refused or finished re-run must leave no trace.
    planned = plan_rerun(spec, rerun)
    if isinstance(planned, AlreadyTrained):
        log.info("%s", planned.message)
        return planned
    spec = planned
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Fail before any worker starts when a shard list names nothing (workers expand them again themselves).
    expand_sources(spec.data)
    if spec.model.checkpoint:
        with storage_errors("model.checkpoint", spec.model.checkpoint):
            resolve_checkpoint(spec.model.checkpoint)
    claim_output_folder(spec.storage, output_owner(spec), overwrite=spec.overwrite)
    refuse_existing(spec)
    write_spec_files(spec.storage, spec)
    with contextlib.ExitStack() as stack:
        if is_local(spec.storage):
            ray_storage = join(spec.storage, RAY_DIR)
        else:
            ray_storage = stack.enter_context(tempfile.TemporaryDirectory(prefix="clipforge-ray-"))
        stack.enter_context(ray_session(spec.ray))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec.model_dump(mode="json")},
            torch_config=TorchConfig(backend="nccl" if spec.scaling.gpus_per_worker > 0 else "gloo"),
            scaling_config=_scaling_config(spec),
            run_config=ray.train.RunConfig(
                name=spec.name,
                storage_path=ray_storage,
                failure_config=_failure_config(spec),
                worker_runtime_env={"env_vars": worker_env(spec)},
            # At run time ray.train exports Train v2's RunConfig (worker_runtime_env); its annotations name v1's.
            ),  # type: ignore[call-arg]
        )
        try:
            _fit(trainer, spec, progress)
        except Exception as e:  # re-raised with the worker's own message
            unplaced = placement_failure(e, spec.name, spec.scaling.workers, worker_resources(spec),
                                         spec.scaling.placement_timeout_s)
            if unplaced is not None:
                raise unplaced from e
            cause = _root_cause(e)
            raise TrainingFailed(f"training `{spec.name}` failed: {type(cause).__name__}: {cause}") from e
    summary = read_summary(spec.storage)
    summary["wall_seconds"] = time.time() - t0
    write_summary(spec.storage, summary)
    log.info("training `%s` done: %d steps, final loss %s, checkpoint %s", spec.name, summary["steps"],
             summary["final_loss"], summary["checkpoint"])
    return summary
