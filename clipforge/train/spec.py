"""Typed spec of a training job (`kind: train`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clipforge.eval.spec import EvalTask
from clipforge.models.spec import LossSpec, ModelSpec
from clipforge.specbase import OutputFolder, RayInit, Scaling, Spec


class DataSource(Spec):
    """One dataset of a mixture: its shards and its share of the training samples."""

    shards: list[str] = Field(..., min_length=1, description="WebDataset shards: files, folders or globs (fsspec).")
    weight: float = Field(
        1.0, gt=0, description="Share of the samples drawn from this source (weight / sum of weights); needs "
        "`data.resampled: true` unless all weights are equal."
    )


class AugmentSpec(Spec):
    """Image augmentation of full-model training (heads-only training always uses the eval transform)."""

    crop_scale: tuple[float, float] | None = Field(
        None, description="Random resized crop: [min, max] share of the image area kept (default: the model "
        "config's train_scale, else [0.9, 1.0]); [1.0, 1.0] keeps the whole image."
    )
    horizontal_flip: bool = Field(False, description="Flip images left-right with probability 0.5.")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0 < v[0] <= v[1] <= 1):
            raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(v)}")
        return v


class TrainDataSpec(Spec):
    shards: list[str] | None = Field(
        None, min_length=1, description="WebDataset shards: files, folders or globs (fsspec). Give this or `sources`."
    )
    sources: list[DataSource] | None = Field(
        None, min_length=1, description="Several datasets mixed by weight, instead of `shards`."
    )
    resampled: bool = Field(
        False, description="Draw shards with replacement (sources by weight) as an endless stream; an epoch is then "
        "a nominal pass (all sources' samples once). Without it every epoch reads each shard once."
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    batch_size: int = Field(256, ge=1, le=4_194_304, description="Global batch size (split evenly across workers).")
    loader_workers: int = Field(1, ge=0, le=256, description="DataLoader processes per training worker.")
    shuffle_buffer: int = Field(1000, ge=0, le=10_000_000, description="Samples held for shuffling (0: no shuffling).")
    image_key: str = Field("jpg;png;webp", description="Sample extensions tried for the image, in order.")
    text_key: str = Field("txt", description="Sample extension of the caption.")

    @model_validator(mode="after")
    def _one_shard_list(self) -> "TrainDataSpec":
        if (self.shards is None) == (self.sources is None):
            raise ValueError("give exactly one of data.shards and data.sources")
        if self.sources and not self.resampled and len({s.weight for s in self.sources}) > 1:
            raise ValueError(
                "data.sources: unequal weights need `data.resampled: true` (shards drawn with replacement); "
                "without it every epoch reads each shard of every source once"
            )
        return self

    def source_list(self) -> list[DataSource]:
        """`shards` as a single source of weight 1, or `sources` as given."""
        if self.sources is not None:
            return self.sources
        assert self.shards is not None  # the validator above requires one of the two
        return [DataSource(shards=self.shards)]


class OptimSpec(Spec):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW weight decay (not applied to norms, biases, temperature)."
    )
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the cosine decay.")
    epochs: int | None = Field(None, ge=1, description="Training length in passes over the data (the default: 1).")
    steps: int | None = Field(None, ge=1, description="Training length in optimizer steps, instead of epochs.")
    samples: int | None = Field(
        None, ge=1, description="Training length in samples (rounded up to whole global batches), instead of epochs."
    )
    grad_clip_norm: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")
    accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step: each rank's batch is run in this many parts, one at a "
        "time, and the step equals one on the whole batch (features of all parts are scored together, so every "
        "sample still sees the whole global batch's negatives). Needs strategy ddp or fsdp2."
    )
    state_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="AdamW moment buffers: fp32, or bf16 with stochastic rounding (half the optimizer memory)."
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN or infinite loss: `stop` ends the run with TrainingDiverged; `skip` drops that "
        "step's update (counted in the metrics as skipped_steps) and stops only after max_skipped_steps in a row."
    )
    max_skipped_steps: int = Field(
        3, ge=1, description="With on_nonfinite: skip, the most consecutive non-finite steps tolerated."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, raw):
        if not isinstance(raw, dict):
            return raw
        given = [k for k in ("epochs", "steps", "samples") if raw.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one training length, not {' and '.join(given)} (optim.epochs, steps or samples)")
        if not given:
            raw = {**raw, "epochs": 1}
        return raw


class ParallelSpec(Spec):
    """Options of the parallelism strategies (each option applies to its own strategy only)."""

    fsdp_cpu_offload: bool = Field(
        False, description="fsdp2: keep the sharded parameters, gradients and optimizer step in CPU memory."
    )
    fsdp_reshard_after_forward: bool = Field(
        True, description="fsdp2: free each block's gathered parameters after its forward (gather again in backward)."
    )
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="deepspeed: ZeRO stage (1: optimizer state sharded, 2: and gradients, 3: and parameters)."
    )
    offload_optimizer: bool = Field(
        False, description="deepspeed: ZeRO-Offload of the optimizer state and step to CPU."
    )
    deepspeed_config: dict[str, Any] | None = Field(
        None, description="deepspeed: a DeepSpeed config used as given; the spec's values (batch sizes, ZeRO stage, "
        "precision, clipping) fill only the keys it leaves out."
    )


class PrecisionSpec(Spec):
    """Numeric precision of training; `precision: amp_bf16` is short for `precision: {mode: amp_bf16}`."""

    mode: Literal["fp32", "amp_bf16", "amp_fp16", "pure_bf16"] = Field(
        "fp32", description="`fp32`; `amp_bf16` / `amp_fp16`: fp32 weights, forward in half precision where safe "
        "(fp16 with a gradient scaler); `pure_bf16`: the trained module itself in bf16."
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="fsdp2 with amp modes: dtype in which gradients are reduced across ranks."
    )
    init_scale: float = Field(2.0 ** 16, gt=0, description="amp_fp16: initial loss scale of the gradient scaler.")


class TrainScaling(Scaling):
    """The training workers, and how long a run waits for Ray to place them."""

    placement_timeout_s: float = Field(
        600.0, gt=0, le=604_800, description="Seconds the run waits for Ray to place all `workers` (at the start "
        "and after every restart) before it fails with a message saying what it asked for and what the cluster "
        "has; while it waits it logs what for and how long. Without a limit Ray Train would wait forever, e.g. "
        "after a node died and no other node can take its workers. Raise it on clusters that add nodes slowly."
    )


class DebugSpec(Spec):
    """Diagnostics that cost time or space, off by default."""

    log_sample_keys: bool = Field(
        False, description="Write the WebDataset keys (`__key__`) of the samples every rank trained on in every "
        "step to STORAGE/sample_keys.jsonl: one line per step and rank, and one line where an attempt starts. A "
        "resumed attempt supersedes the lines a cut-off attempt wrote after the checkpoint it resumes from, and "
        "`clipforge.runtime.run_dir.read_sample_keys` returns {step: keys} as the run finally trained. Costs one "
        "gather over ranks per step; on object stores the file is rewritten before every checkpoint, at the end "
        "and at most once a minute in between, local files get every step at once."
    )


class CheckpointSpec(Spec):
    every_epochs: int = Field(1, ge=1, description="Write a checkpoint every N epochs (and at the end).")
    every_steps: int | None = Field(None, ge=1, description="Also write a checkpoint every N optimizer steps.")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")


# Options that act under one strategy, precision mode or loss only, as (section, field, selector, values that use
# it). A non-default value under another selector would silently do nothing, so it is refused. Compared with the
# defaults rather than with the fields set: a spec dumped into a run directory (and sent to workers) sets them all.
_ONLY_FOR = (
    ("parallel", "fsdp_cpu_offload", "strategy", ("fsdp2",)),
    ("parallel", "fsdp_reshard_after_forward", "strategy", ("fsdp2",)),
    ("parallel", "zero_stage", "strategy", ("deepspeed",)),
    ("parallel", "offload_optimizer", "strategy", ("deepspeed",)),
    ("parallel", "deepspeed_config", "strategy", ("deepspeed",)),
    ("precision", "reduce_dtype", "strategy", ("fsdp2",)),
    ("precision", "init_scale", "precision.mode", ("amp_fp16",)),
    ("loss", "tile_size", "loss.kind", ("clip_tiled",)),
)


def _selector(spec: "TrainSpec", name: str):
    return {"strategy": spec.strategy, "precision.mode": spec.precision.mode, "loss.kind": spec.loss.kind}[name]


class TrainSpec(Spec):
    """`kind: train` — contrastive training on Ray Train."""

    kind: Literal["train"]
    name: str = Field("train", description="Run name.")
    storage: OutputFolder = Field(
        ..., description="Run directory (local or fsspec): checkpoints/, metrics.jsonl, spec.yaml."
    )
    overwrite: bool = Field(
        False, description="Write into `storage` even if it holds files of something else (another job, or not "
        "clipforge at all): files of the same names are replaced, others are left alone. Without it the folder must "
        "be empty, missing, or this run's own earlier output (which `resume` then continues).",
    )
    model: ModelSpec
    data: TrainDataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    strategy: Literal["ddp", "fsdp2", "deepspeed"] = Field(
        "ddp", description="Parallelism: `ddp` (replicated model), `fsdp2` (parameters sharded per block) or "
        "`deepspeed` (ZeRO stage `parallel.zero_stage`)."
    )
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    precision: PrecisionSpec = Field(default_factory=PrecisionSpec)
    cache_frozen_features: bool = Field(
        True,
        description="With `model.trainable: heads`, compute the frozen towers' outputs once and train the heads on "
        "them (no augmentation is lost: heads-only training uses the eval transform).",
    )
    resume: bool = Field(
        True,
        description="Continue from the latest complete checkpoint in STORAGE/checkpoints when there is one "
        "(`auto` means the same); `false` refuses to start in a run directory that already holds checkpoints.",
    )
    max_failures: int = Field(
        0, ge=0, description="Times Ray Train restarts the workers after a worker or node dies; each restart "
        "resumes from the latest checkpoint. A restart whose workers Ray cannot place within "
        "`scaling.placement_timeout_s`, or one of whose workers dies while the group starts, ends the run."
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Run `eval_tasks` every N steps and at the end; results go to metrics.jsonl."
    )
    eval_tasks: list[EvalTask] = Field(
        default_factory=list, description="Evaluation tasks (the eval job's task schema), run at the end of training "
        "and every `eval_every_steps`; results go to metrics.jsonl as `eval/<dataset>/<metric>`."
    )
    eval_batch_size: int = Field(
        64, ge=1, le=65536, description="Images per embedding batch in evaluations during training."
    )
    tensorboard: bool = Field(True, description="Also write the metrics as TensorBoard events to STORAGE/tensorboard.")
    log_every_steps: int = Field(10, ge=1, description="Append a metrics line every N steps.")
    seed: int = Field(0, description="Seed for data order and initialisation.")
    scaling: TrainScaling = Field(default_factory=TrainScaling)
    debug: DebugSpec = Field(default_factory=DebugSpec)
    ray: RayInit = Field(default_factory=RayInit)

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_auto(cls, v):
        return True if isinstance(v, str) and v.strip().lower() == "auto" else v

    @model_validator(mode="after")
    def _eval_schedule(self) -> "TrainSpec":
        if self.eval_every_steps is not None and not self.eval_tasks:
            raise ValueError("eval_every_steps is set but eval_tasks is empty")
        seen: set[tuple[str, str]] = set()
        for t in self.eval_tasks:
            if (t.dataset, t.task) in seen:
                raise ValueError(f"eval_tasks: {t.task} on dataset {t.dataset!r} is listed twice")
            seen.add((t.dataset, t.task))
        return self

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_shorthand(cls, v):
        return {"mode": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _strategy_supports(self) -> "TrainSpec":
        heads_on_cache = self.model.trainable == "heads" and self.cache_frozen_features
        if self.strategy != "ddp" and heads_on_cache:
            raise ValueError(
                f"strategy {self.strategy}: heads-only training on cached features trains only the small projection "
                "heads; use strategy ddp, or cache_frozen_features: false"
            )
        if self.strategy == "deepspeed":
            if self.optim.accumulation_steps > 1:
                raise ValueError("optim.accumulation_steps > 1 needs strategy ddp or fsdp2 (DeepSpeed would sum "
                                 "micro-batch gradients, each seeing only its own negatives)")
            if isinstance(self.model.trainable, list):
                raise ValueError("model.trainable as a list of stages needs strategy ddp or fsdp2 (a DeepSpeed engine "
                                 "fixes its trainable parameters when it is built)")
            if self.precision.mode == "amp_fp16":
                raise ValueError("precision amp_fp16 is not supported with strategy deepspeed (its fp16 autocast "
                                 "skips every step on CPU workers); use amp_bf16 or pure_bf16")
        if self.strategy == "fsdp2" and self.optim.state_dtype == "bf16":
            raise ValueError("optim.state_dtype bf16 is not supported with strategy fsdp2 (its sharded parameters "
                             "are DTensors); use ddp or deepspeed, or state_dtype fp32")
        return self

    @model_validator(mode="after")
    def _options_of_other_strategies(self) -> "TrainSpec":
        for section, field, selector, users in _ONLY_FOR:
            part = getattr(self, section)
            value = getattr(part, field)
            if value != type(part).model_fields[field].default and _selector(self, selector) not in users:
                raise ValueError(
                    f"{section}.{field} applies to {selector} {' or '.join(users)} only, and this spec's {selector} "
                    f"is {_selector(self, selector)}: remove it or change {selector}"
                )
        return self

    @model_validator(mode="after")
    def _batch_divisible(self) -> "TrainSpec":
        if self.data.batch_size % self.scaling.workers:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by "
                f"scaling.workers ({self.scaling.workers})"
            )
        return self

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> "TrainSpec":
        local = self.data.batch_size // self.scaling.workers
        if local % self.optim.accumulation_steps:
            raise ValueError(
                f"each worker's batch ({local} = data.batch_size / scaling.workers) must be divisible by "
                f"optim.accumulation_steps ({self.optim.accumulation_steps})"
            )
        return self
