"""The training loop of one worker (one rank); Ray Train runs `train_loop_per_worker` on every worker.

The loop itself (`train_worker`) knows nothing about Ray: it gets its rank, device and a report
function, and uses torch.distributed collectives only when a process group exists, so it also runs
as a single plain process.

Resume order (when STORAGE/checkpoints holds a complete checkpoint and `resume` is on):
  1. build the model with the checkpoint's weights (every rank reads the same files, before any
     wrapping, so all ranks start identical); a run whose checkpoint already has all epochs stops here;
  2. plan the data split and, for cached heads-only training, compute the frozen features
     (they depend on the towers only, which heads-only training never changes);
  3. wrap the trainable module with `parallelize`;
  4. build the optimizer over the same parameters in the same order, then load its state;
  5. build the schedule for the current spec's total steps, then restore its step position;
  6. continue with the epoch after the checkpoint's; data order depends only on (seed, epoch),
     so the resumed epochs see the same order as an uninterrupted run.
Epochs are counted from 1 in metrics and checkpoint names (epoch_0003 holds the state after 3 epochs).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from clipforge.models import create_model
from clipforge.models.losses import clamp_logit_scale, create_loss
from clipforge.train import checkpoints
from clipforge.train.collectives import all_mean, all_min_int, all_sum_int, barrier
from clipforge.train.data import SkipCounter
from clipforge.train.optim import WarmupCosine, build_optimizer
from clipforge.train.parallelize import parallelize, unwrap
from clipforge.train.sources import batch_source
from clipforge.train.spec import TrainSpec
from clipforge.train.storage import MetricsLog, join, write_json

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Called on every rank at the end of each epoch: Ray Train's report is a collective (a barrier
    # through an actor), too slow to call every few steps.
    report: Callable[[dict], None] = lambda metrics: None


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0  # epochs completed
    samples_seen: int = 0
    samples_this_run: int = 0
    train_seconds: float = 0.0  # time inside training steps in this run, data waits included
    last_loss: float = float("nan")
    skipped: SkipCounter = field(default_factory=SkipCounter)


@dataclass
class Optimisation:
    """Everything one step updates."""

    module: torch.nn.Module  # wrapped by `parallelize`
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    loss_fn: torch.nn.Module
    params: list[torch.nn.Parameter]


class StepClock:
    """Throughput over the steps since the last metrics line."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.restart()

    def restart(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0

    def metrics(self, progress: Progress, epoch: int, lr: float, logit_scale: float) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "step": progress.step,
            "epoch": epoch + 1,
            "loss": progress.last_loss,
            "lr": lr,
            "logit_scale": logit_scale,
            "samples_per_second": self.steps * self.global_batch / elapsed,
            "step_time": elapsed / max(self.steps, 1),
            "time": time.time(),
            "samples_seen": progress.samples_seen,
        }


def _synchronised(batches, steps: int):
    """At most `steps` batches, ending on every rank as soon as any rank runs out (skipped samples)."""
    for _ in range(steps):
        batch = next(batches, None)
        if all_min_int(0 if batch is None else 1) == 0:
            return
        yield batch


def _step(opt: Optimisation, inputs, spec: TrainSpec, progress: Progress, epoch: int) -> tuple[float, float]:
    """One optimizer step on the global batch; returns (learning rate, exp(logit_scale)) used."""
    lr = opt.schedule.apply()
    # (image features, text features, temperature[, logit bias]): the siglip loss takes the bias too.
    outputs = opt.module(*inputs)
    scale = outputs[2]
    loss = opt.loss_fn(*outputs)
    opt.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if spec.optim.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(opt.params, spec.optim.grad_clip_norm)
    opt.optimizer.step()
    clamp_logit_scale(unwrap(opt.module), spec.loss.max_logit_scale)
    opt.schedule.advance()
    progress.step += 1
    # The mean over ranks is the global-batch loss; a NaN on any rank reaches every rank, so all stop together.
    progress.last_loss = all_mean(float(loss.detach()))
    if not math.isfinite(progress.last_loss):
        raise TrainingDiverged(
            f"loss is {progress.last_loss} at step {progress.step} (epoch {epoch + 1}); "
            "lower optim.lr, add optim.warmup_steps or set optim.grad_clip_norm"
        )
    return lr, float(scale.detach())


def _summary(progress: Progress, spec: TrainSpec, resume_from: str | None, meta: dict) -> dict:
    return {
        "steps": progress.step,
        "epochs": progress.epoch,
        "samples_seen": progress.samples_seen,
        "samples_per_second": progress.samples_this_run / progress.train_seconds if progress.train_seconds else 0.0,
        "train_seconds": progress.train_seconds,
        "final_loss": progress.last_loss if progress.samples_this_run else meta.get("loss"),
        "skipped_samples": all_sum_int(progress.skipped.count),
        "resumed_from": resume_from,
        "checkpoint": checkpoints.latest(checkpoints.checkpoint_root(spec)),
    }


def train_worker(spec: TrainSpec, ctx: WorkerContext | None = None) -> dict:
    """Train as one rank of `ctx.world_size`; returns the run summary (the same on every rank)."""
    ctx = ctx or WorkerContext()
    if ctx.world_size != spec.scaling.workers:
        # The local batch is data.batch_size / scaling.workers: another world size would change the global batch.
        raise ValueError(f"scaling.workers is {spec.scaling.workers} but {ctx.world_size} ranks are training")
    torch.manual_seed(spec.seed * 1000 + ctx.rank)  # augmentations differ per rank and repeat per run
    progress = Progress()
    resume_from = checkpoints.resume_point(spec)
    meta = checkpoints.resume_state(resume_from) if resume_from else {}
    progress.step, progress.epoch = int(meta.get("step", 0)), int(meta.get("epoch", 0))
    progress.samples_seen = int(meta.get("samples_seen", 0))
    if resume_from and progress.epoch >= spec.optim.epochs:
        log.info("%s already holds all %d epochs; nothing to train", resume_from, spec.optim.epochs)
        return _summary(progress, spec, resume_from, meta)

    bundle = create_model(spec.model.model_copy(update={"checkpoint": resume_from}) if resume_from else spec.model)
    model = bundle.model.to(ctx.device)
    # create_model pins frozen trunks to eval mode; the whole model trains only when everything does.
    model.train(spec.model.trainable != "heads")
    source = batch_source(spec, bundle, ctx.rank, ctx.world_size, ctx.device, progress.skipped)
    wrapped = parallelize(source.module, spec, ctx.device)
    optimizer = build_optimizer(unwrap(wrapped), spec.optim)
    opt = Optimisation(
        module=wrapped,
        optimizer=optimizer,
        schedule=WarmupCosine(optimizer, spec.optim, source.steps * spec.optim.epochs),
        loss_fn=create_loss(spec.loss),
        params=[p for p in unwrap(wrapped).parameters() if p.requires_grad],
    )
    if resume_from:
        checkpoints.restore_training_state(resume_from, opt.optimizer, opt.schedule)
        if ctx.rank == 0:
            log.info("resumed from %s after epoch %d (step %d)", resume_from, progress.epoch, progress.step)
    metrics_log = None
    if ctx.rank == 0:
        metrics_log = MetricsLog(join(spec.storage, "metrics.jsonl"), progress.step if resume_from else None)

    clock = StepClock(spec.data.batch_size)
    last: dict | None = None
    for epoch in range(progress.epoch, spec.optim.epochs):
        epoch_start = step_start = time.perf_counter()
        epoch_steps = 0
        for inputs in _synchronised(source.epoch_batches(epoch), source.steps):
            lr, scale = _step(opt, inputs, spec, progress, epoch)
            now = time.perf_counter()
            progress.train_seconds += now - step_start
            step_start = now
            progress.samples_seen += spec.data.batch_size
            progress.samples_this_run += spec.data.batch_size
            epoch_steps += 1
            clock.steps += 1
            last = clock.metrics(progress, epoch, lr, scale)
            if progress.step % spec.log_every_steps == 0:
                if metrics_log is not None:
                    metrics_log.append(last)
                clock.restart()
        progress.epoch = epoch + 1
        if last is not None:
            ctx.report(last)
        if ctx.rank == 0:
            log.info("epoch %d/%d: %d steps, loss %.4f, %.1fs", progress.epoch, spec.optim.epochs, epoch_steps,
                     progress.last_loss, time.perf_counter() - epoch_start)
        if progress.epoch % spec.checkpoint.every_epochs == 0 or progress.epoch == spec.optim.epochs:
            if ctx.rank == 0:
                checkpoints.save(spec, model, bundle.name, opt.optimizer, opt.schedule, progress)
            # Nobody goes on (or resumes, or evaluates) before the checkpoint is complete.
            barrier()
    if metrics_log is not None and last is not None and last["step"] % spec.log_every_steps:
        metrics_log.append(last)
    return _summary(progress, spec, resume_from, meta)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: rebuild the spec, run the loop, let rank 0 write the run summary."""
    import ray.train
    import ray.train.torch

    spec = TrainSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    ctx = WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=lambda metrics: ray.train.report(metrics),
    )
    summary = train_worker(spec, ctx)
    if ctx.rank == 0:
        write_json(join(spec.storage, "summary.json"), summary)
