"""The training loop of one worker (one rank); Ray Train runs `train_loop_per_worker` on every worker.

The loop itself (`train_worker`) knows nothing about Ray: it gets its rank, device and a report
function, and uses torch.distributed collectives only when a process group exists, so it also runs
as a single plain process.

Resume order (when STORAGE/checkpoints holds a checkpoint that verifies -- files complete and matching
the SHA-256 recorded in its meta.json, model weights finite -- and `resume` is on; damaged newer
checkpoints are passed over, newest first, with a warning):
  1. read meta.json: global step, epochs completed, step within the current epoch, samples seen,
     skip counters and the number of earlier restarts; a run whose budget (optim.epochs, steps or
     samples) is already reached stops here;
  2. build the model with the checkpoint's weights (every rank reads the same files, before any
     wrapping, so all ranks start identical);
  3. plan the data and, for cached heads-only training, compute the frozen features (they depend on
     the towers only, which heads-only training never changes);
  4. apply the fine-tuning stage of the saved step (`model.trainable` as a list of stages), then wrap the
     trainable module with `parallelize` (`strategy.build_strategy`);
  5. build the optimizer over the same parameters in the same order, then load its state (the full,
     strategy-independent format of `checkpoint_state`);
  6. build the schedule for the current spec's total steps, then restore its step position (and the
     gradient scaler's state, when there is one);
  7. continue the epoch at its saved step. Data order depends only on (seed, epoch, rank, loader), and
     the checkpoint holds, per rank, how many items of each loader's stream the consumed batches
     took; those items are read again but dropped undecoded, so the resumed epoch continues with
     exactly the samples an uninterrupted run would have used next. This needs the same worker and
     loader counts; with others the part-way epoch restarts from its first sample. Cached features
     continue at the saved step of the epoch's fixed order; resampled data draws a new stream seeded
     by the resume step (nothing is replayed). Augmentation draws are reseeded by the resume step.
The metrics log keeps the lines up to the checkpoint's step and then continues, so no step appears
twice; every line carries `restarts`, the number of resumes so far. The sample-key log
(`debug.log_sample_keys`) keeps every attempt's lines instead: readers let the resumed attempt supersede
the steps after its checkpoint (see clipforge.train.sample_keys).
Epochs are counted from 1 in metrics; checkpoint epoch_0003 holds the state after 3 epochs and
step_00000120 the state after step 120 (part-way through an epoch).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from clipforge.errors import UserError
from clipforge.models import create_model
from clipforge.models.accumulation import accumulated_step
from clipforge.models.losses import create_loss
from clipforge.models.regimes import apply_regime, schedule_parameter_names, stage_at
from clipforge.runtime.run_dir import MetricsLog, metrics_path, write_summary
from clipforge.train import budget, rerun, run_checkpoints
from clipforge.train.checkpoint_state import Held
from clipforge.train.collectives import all_gather_object, all_mean, all_min_int, all_sum_int, barrier
from clipforge.train.data import SkipCounter
from clipforge.train.eval_hook import PeriodicEval
from clipforge.train.monitoring import DataWait, line_resources, write_worker_file
from clipforge.train.optimizer import WarmupCosine
from clipforge.train.parallelize import unwrap
from clipforge.train.sample_keys import SampleKeyLog
from clipforge.train.sources import BatchSource, NotEnoughData, batch_source
from clipforge.train.spec import TrainSpec
from clipforge.train.strategy import Strategy, build_strategy
from clipforge.train.tensorboard import TensorBoardLog, open_tensorboard
from clipforge.train.train_step import TrainStep

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
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
    step_in_epoch: int = 0  # steps done in the current (not yet completed) epoch
    samples_seen: int = 0
    samples_this_run: int = 0
    train_seconds: float = 0.0  # time inside training steps in this run, data waits included
    last_loss: float = float("nan")
    skipped: SkipCounter = field(default_factory=SkipCounter)
    restarts: int = 0  # times this run was resumed from a checkpoint
    skipped_before: tuple[int, int] = (0, 0)  # (samples, shards) skipped before the resume, all ranks


def _restore_counters(progress: Progress, meta: dict) -> None:
    progress.step, progress.epoch = int(meta.get("step", 0)), int(meta.get("epoch", 0))
    progress.step_in_epoch = int(meta.get("step_in_epoch", 0))
    progress.samples_seen = int(meta.get("samples_seen", 0))
    progress.restarts = int(meta.get("restarts", 0)) + 1 if meta else 0
    progress.skipped_before = (int(meta.get("skipped_samples", 0)), int(meta.get("skipped_shards", 0)))


@dataclass
class Optimisation:
    """Everything one step updates, and the step's own counters."""

    strategy: Strategy  # the wrapped module, its optimizer, step and checkpoint state (see `build_strategy`)
    schedule: WarmupCosine
    loss_fn: torch.nn.Module
    regime: object = None  # the fine-tuning stage's `trainable` in force
    skipped_steps: int = 0  # steps dropped for a non-finite loss, over the whole run
    consecutive_skips: int = 0
    step_metrics: dict = field(default_factory=dict)  # added to the metrics line of the last step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.strategy.optimizer


def _optimisation(spec: TrainSpec, module: torch.nn.Module, device: torch.device, total_steps: int,
                  progress: Progress, meta: dict) -> Optimisation:
    """Wrap the trained module and build its optimizer, in the fine-tuning stage of the (resumed) step.

    With a list of stages the optimizer holds every parameter that trains in some stage from the start
    (the same parameters in the same order at every resume); the current stage's regime decides which of
    them get gradients.
    """
    trainable, names, regime = spec.model.trainable, None, None
    if isinstance(trainable, list):
        regime = stage_at(trainable, progress.step, progress.epoch)
        # create_model applied the first stage; a resumed run continues in its own stage.
        apply_regime(module, trainable, progress.step, progress.epoch)
        names = schedule_parameter_names(module, trainable)
    strategy = build_strategy(module, spec, device, names)
    skipped = int((meta.get("metrics") or {}).get("skipped_steps", 0))
    return Optimisation(strategy=strategy, schedule=WarmupCosine(strategy.optimizer, spec.optim, total_steps),
                        loss_fn=create_loss(spec.loss), regime=regime, skipped_steps=skipped)


def _switch_stage(opt: Optimisation, spec: TrainSpec, progress: Progress, epoch: int) -> None:
    """At a stage boundary of `model.trainable`: freeze/unfreeze as the new stage says and re-wrap."""
    if not isinstance(spec.model.trainable, list):
        return
    regime = stage_at(spec.model.trainable, progress.step, epoch)
    if regime == opt.regime:
        return
    names = apply_regime(opt.strategy.wrapped.root, spec.model.trainable, progress.step, epoch)
    opt.strategy.wrapped.regime_changed()
    opt.regime = regime
    log.info("step %d: fine-tuning stage changes, %d parameter tensors train now", progress.step, len(names))


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


class _Forward:
    """The wrapped module's forward as `accumulated_step` calls it (with the strategy's `no_sync`)."""

    def __init__(self, step: TrainStep):
        self.step = step
        self.no_sync = step.no_sync

    def __call__(self, *inputs):
        return self.step.forward(*inputs)


def _loss_and_backward(opt: Optimisation, inputs, spec: TrainSpec) -> tuple[torch.Tensor, float, bool]:
    """(local loss, exp(logit_scale) used, whether backward already ran)."""
    par, k = opt.strategy.step, spec.optim.accumulation_steps
    if k > 1:
        micro_batches = list(zip(*(x.chunk(k) for x in inputs)))
        # Every micro-batch's backward runs inside, on the loss scaled for amp_fp16.
        loss = accumulated_step(_Forward(par), micro_batches, lambda *out: par.scaled(opt.loss_fn(*out)))
        return loss / par.loss_scale(), par.logit_scale(), True
    # (image features, text features, temperature[, logit bias]): the siglip loss takes the bias too.
    outputs = par.forward(*inputs)
    return opt.loss_fn(*outputs), float(outputs[2].detach()), False


def _step(opt: Optimisation, inputs, spec: TrainSpec, progress: Progress, epoch: int) -> tuple[float, float]:
    """One optimizer step on the global batch; returns (learning rate, exp(logit_scale)) used.

    The loss checked for NaN/inf is the mean over ranks, so every rank decides alike: `stop` raises
    TrainingDiverged, `skip` drops the update (the schedule still advances: the batch was used).
    """
    _switch_stage(opt, spec, progress, epoch)
    par = opt.strategy.step
    lr = opt.schedule.apply()
    par.zero_grad()
    loss, scale, backward_done = _loss_and_backward(opt, inputs, spec)
    # The mean over ranks is the global-batch loss; a NaN on any rank reaches every rank.
    global_loss = all_mean(float(loss.detach()))
    finite = math.isfinite(global_loss)
    dropping = spec.optim.on_nonfinite == "skip" and par.needs_backward_to_drop()
    if not backward_done and (finite or dropping):
        par.backward(loss)
    grad_norm = None
    if finite:
        opt.consecutive_skips = 0
        grad_norm = par.step(spec.optim.grad_clip_norm)
        par.clamp_logit_scale(spec.loss.max_logit_scale)
    else:
        par.drop()
        opt.skipped_steps += 1
        opt.consecutive_skips += 1
        if spec.optim.on_nonfinite == "stop" or opt.consecutive_skips > spec.optim.max_skipped_steps:
            tail = "" if spec.optim.on_nonfinite == "stop" else f" ({opt.consecutive_skips} steps in a row)"
            raise TrainingDiverged(
                f"loss is {global_loss} at step {progress.step + 1} (epoch {epoch + 1}){tail}; "
                "lower optim.lr, add optim.warmup_steps or set optim.grad_clip_norm"
            )
        log.warning("step %d: loss is %s; update skipped (%d in a row)", progress.step + 1, global_loss,
                    opt.consecutive_skips)
    opt.schedule.advance()
    progress.step += 1
    progress.last_loss = global_loss
    opt.step_metrics = {"grad_norm": grad_norm, "skipped_steps": opt.skipped_steps}
    if par.scaler is not None:
        opt.step_metrics["loss_scale"] = par.loss_scale()
    return lr, scale


def _summary(progress: Progress, spec: TrainSpec, resume_from: str | None, meta: dict) -> dict:
    """The run summary (a collective: every rank calls it)."""
    skipped_samples = progress.skipped_before[0] + all_sum_int(progress.skipped.count)
    skipped_shards = progress.skipped_before[1] + all_sum_int(progress.skipped.shards)
    return {
        "steps": progress.step,
        "epochs": progress.epoch,
        "samples_seen": progress.samples_seen,
        "samples_per_second": progress.samples_this_run / progress.train_seconds if progress.train_seconds else 0.0,
        "train_seconds": progress.train_seconds,
        "final_loss": progress.last_loss if progress.samples_this_run else meta.get("loss"),
        "skipped_samples": skipped_samples,
        "skipped_shards": skipped_shards,
        "restarts": progress.restarts,
        "resumed_from": resume_from,
        "checkpoint": run_checkpoints.latest(run_checkpoints.checkpoint_root(spec)),
    }


def train_worker(spec: TrainSpec, ctx: WorkerContext | None = None) -> dict:
    """Train as one rank of `ctx.world_size`; returns the run summary (the same on every rank)."""
    ctx = ctx or WorkerContext()
    if ctx.world_size != spec.scaling.workers:
        # The local batch is data.batch_size / scaling.workers: another world size would change the global batch.
        raise ValueError(f"scaling.workers is {spec.scaling.workers} but {ctx.world_size} ranks are training")
    progress = Progress()
    resume_from = run_checkpoints.resume_point(spec)
    meta = run_checkpoints.resume_state(resume_from) if resume_from else {}
    _restore_counters(progress, meta)
    # Augmentations differ per rank and repeat per run (a resumed run: per resume step).
    torch.manual_seed(spec.seed * 1000 + ctx.rank + 7919 * progress.step)
    known_total = budget.total_steps(spec.optim, 0, spec.data.batch_size)  # all but epoch budgets
    if resume_from and budget.finished(spec.optim, progress.epoch, progress.step, known_total):
        log.info("%s already holds all %s; nothing to train", resume_from, budget.describe(spec.optim))
        return _summary(progress, spec, resume_from, meta)

    bundle = create_model(spec.model.model_copy(update={"checkpoint": resume_from}) if resume_from else spec.model)
    model = bundle.model.to(ctx.device)
    # create_model pins frozen trunks to eval mode; the whole model trains only when everything does.
    model.train(spec.model.trainable != "heads")
    source = batch_source(spec, bundle, ctx.rank, ctx.world_size, ctx.device, progress.skipped)
    total_steps = budget.total_steps(spec.optim, source.steps, spec.data.batch_size)
    opt = _optimisation(spec, source.module, ctx.device, total_steps, progress, meta)
    if resume_from:
        run_checkpoints.restore_training_state(resume_from, opt.strategy.state.optimizer_state, opt.schedule,
                                           opt.strategy.step.scaler)
        if ctx.rank == 0:
            log.info("resumed from %s after epoch %d (step %d)", resume_from, progress.epoch, progress.step)
    metrics_log, board, sample_keys = None, None, None
    if ctx.rank == 0:
        rerun.record_spec(spec, progress.step, meta)
        resume_step = progress.step if resume_from else None
        metrics_log = MetricsLog(metrics_path(spec.storage), resume_step)
        board = open_tensorboard(spec.storage, resume_step) if spec.tensorboard else None
        if spec.debug.log_sample_keys:
            sample_keys = SampleKeyLog(spec.storage, progress.step, progress.restarts, resumed=bool(resume_from))
    evaluate = None
    if spec.eval_tasks:
        evaluate = PeriodicEval(spec.eval_tasks, bundle.preprocess_val, bundle.tokenizer, ctx.rank, ctx.world_size,
                                spec.eval_batch_size, ctx.device)
    write_worker_file(spec.storage, ctx.rank, start_step=progress.step,
                      **({"total_steps": total_steps} if ctx.rank == 0 else {}))
    run = _Run(spec, ctx, progress, opt, source, model, bundle.name, total_steps, metrics_log, board, evaluate,
               sample_keys)
    try:
        run.train(_saved_position(meta, source, ctx))
    finally:
        if board is not None:
            board.close()
        if sample_keys is not None:
            sample_keys.flush()  # also when training failed: the keys of the steps before the failure
    return _summary(progress, spec, resume_from, meta)


def _saved_position(meta: dict, source: BatchSource, ctx: WorkerContext) -> dict | None:
    """This rank's data position from the checkpoint, if it was written by the same data layout."""
    saved = meta.get("data_position") or {}
    if saved.get("layout") != source.layout or saved.get("world_size") != ctx.world_size:
        return None
    ranks = saved.get("ranks") or []
    return ranks[ctx.rank] if ctx.rank < len(ranks) else None


class _Run:
    """The step loop of one rank and what happens between steps: metrics lines, evaluations, checkpoints.

    Every decision between steps depends only on counters that all ranks share, so the collectives
    inside (metrics gathering, evaluation, checkpoint positions) are entered by all ranks together.
    """

    def __init__(self, spec: TrainSpec, ctx: WorkerContext, progress: Progress, opt: Optimisation,
                 source: BatchSource, model: torch.nn.Module, model_name: str, total_steps: int,
                 metrics_log: MetricsLog | None, board: TensorBoardLog | None, evaluate: PeriodicEval | None,
                 sample_keys: SampleKeyLog | None = None):
        self.spec, self.ctx, self.progress, self.opt, self.source = spec, ctx, progress, opt, source
        self.model, self.model_name, self.total_steps = model, model_name, total_steps
        self.metrics_log, self.board, self.evaluate = metrics_log, board, evaluate
        self.sample_keys = sample_keys  # rank 0 with debug.log_sample_keys
        self.clock = StepClock(spec.data.batch_size)
        self.wait = DataWait()
        self.last: dict | None = None
        self.logged_step = -1
        self.saved: tuple[int, int] | None = None

    def finished(self) -> bool:
        p = self.progress
        return budget.finished(self.spec.optim, p.epoch, p.step, self.total_steps)

    def train(self, saved: dict | None) -> None:
        p = self.progress
        while not self.finished():
            epoch, start = p.epoch, p.step_in_epoch
            if start >= self.source.steps:
                # Resumed at a step past this epoch's end: the data now gives fewer steps per epoch.
                self._end_epoch(epoch)
                continue
            todo = self.source.steps - start
            if self.spec.optim.epochs is None:
                todo = min(todo, self.total_steps - p.step)
            stream = self.source.epoch_batches(epoch, start, saved if start else None)
            saved = None
            ran = self._epoch(epoch, _synchronised(self.wait.timed(stream), todo))
            if ran < todo and p.epoch == epoch:
                # The data ran out before the planned steps (damaged shards): the epoch ends here.
                if ran == 0 and start == 0:
                    raise NotEnoughData(f"epoch {epoch + 1} produced no batch: every sample was skipped")
                self._end_epoch(epoch)
                self._between_steps(epoch_done=True)

    def _epoch(self, epoch: int, batches) -> int:
        p, batch = self.progress, self.spec.data.batch_size
        ran = 0
        step_start = time.perf_counter()
        for inputs in batches:
            lr, scale = _step(self.opt, inputs, self.spec, p, epoch)
            p.train_seconds += time.perf_counter() - step_start
            self._record_sample_keys(epoch)
            p.samples_seen += batch
            p.samples_this_run += batch
            p.step_in_epoch += 1
            ran += 1
            self.clock.steps += 1
            self.last = self.clock.metrics(p, epoch, lr, scale)
            self.last["restarts"] = p.restarts
            self.last.update(self.opt.step_metrics)
            epoch_done = p.step_in_epoch >= self.source.steps
            if epoch_done:
                self._end_epoch(epoch)
            self._between_steps(epoch_done)
            step_start = time.perf_counter()
        return ran

    def _record_sample_keys(self, epoch: int) -> None:
        """With debug.log_sample_keys: the keys of the step just taken, from every rank (a collective)."""
        if not self.spec.debug.log_sample_keys:
            return
        keys = all_gather_object(self.source.batch_keys())
        if self.sample_keys is not None:
            self.sample_keys.record(self.progress.step, epoch + 1, keys)

    def _end_epoch(self, epoch: int) -> None:
        p = self.progress
        p.epoch, p.step_in_epoch = epoch + 1, 0
        if self.last is not None:
            self.ctx.report(self.last)
        if self.ctx.rank == 0:
            log.info("epoch %d done at step %d, loss %.4f", p.epoch, p.step, p.last_loss)

    def _between_steps(self, epoch_done: bool) -> None:
        spec, p = self.spec, self.progress
        finished = self.finished()
        every = spec.eval_every_steps
        evaluated = self.evaluate is not None and ((every is not None and p.step % every == 0) or finished)
        evals = self._evaluate() if evaluated else {}
        # An evaluation always gets a line of its step: its results ride on the training line.
        if evaluated or p.step % spec.log_every_steps == 0 or finished:
            self._log_line(evals)
        ckpt = spec.checkpoint
        if (finished or (ckpt.every_steps and p.step % ckpt.every_steps == 0)
                or (epoch_done and p.epoch % ckpt.every_epochs == 0)):
            t0 = time.perf_counter()
            self._checkpoint()
            # Checkpoint writing is not part of the training throughput (evaluations come before the clock reads).
            self.clock.start += time.perf_counter() - t0

    def _evaluate(self) -> dict:
        """Results on rank 0, {} elsewhere (every rank takes part)."""
        assert self.evaluate is not None  # called only when the run evaluates
        with self.opt.strategy.wrapped.full_parameters():
            results = self.evaluate(unwrap(self.model))
        if self.ctx.rank == 0:
            shown = {k: round(v, 4) for k, v in results.items()}
            log.info("step %d eval: %s", self.progress.step, shown)
        return results

    def _log_line(self, evals: dict) -> None:
        if self.last is None or self.last["step"] == self.logged_step:
            return
        self.last.update(line_resources(self.wait.take(), self.clock.steps, self.last["step_time"], self.ctx.device))
        self.logged_step = self.last["step"]
        if self.metrics_log is not None:
            record = {**self.last, **evals}
            self.metrics_log.append(record)
            if self.board is not None:
                self.board.write(record)
        self.clock.restart()

    def _checkpoint(self) -> None:
        p = self.progress
        if self.saved == (p.step, p.epoch):
            return
        self.saved = (p.step, p.epoch)
        positions = all_gather_object(self.source.position())
        # Sharded strategies gather the full state dicts collectively; rank 0 receives them.
        model_state, optim_state = self.opt.strategy.state.state_dicts(self.model)
        skipped = (all_sum_int(p.skipped.count), all_sum_int(p.skipped.shards))
        if self.ctx.rank == 0:
            assert model_state is not None and optim_state is not None  # rank 0 receives them
            if self.sample_keys is not None:
                # Before the checkpoint exists: an attempt resuming from it would not write these steps again.
                self.sample_keys.flush()
            extra = {
                "step_in_epoch": p.step_in_epoch,
                "data_position": {"layout": self.source.layout, "world_size": self.ctx.world_size,
                                  "ranks": positions},
                "metrics": self.last,
                "skipped_samples": p.skipped_before[0] + skipped[0],
                "skipped_shards": p.skipped_before[1] + skipped[1],
                "restarts": p.restarts,
            }
            run_checkpoints.save(self.spec, Held(model_state), self.model_name, Held(optim_state), self.opt.schedule, p,
                             extra, scaler=self.opt.strategy.step.scaler)
            if self.board is not None:
                self.board.flush()
        # Nobody goes on (or resumes, or evaluates) before the checkpoint is complete.
        barrier()


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
        write_summary(spec.storage, summary)
