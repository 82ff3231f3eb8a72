"""The DeepSpeed config of a training spec: the spec's values under a user's `parallel.deepspeed_config`.

A config given in the spec is used as given; the spec fills only the keys it leaves out (recursively,
so `zero_optimization: {overlap_comm: true}` still gets the spec's stage). Keys that would contradict
how clipforge trains (its own optimizer and schedule, one optimizer step per global batch) are errors.
"""
from __future__ import annotations

import copy
from typing import Any

from clipforge.errors import UserError
from clipforge.train import precision
from clipforge.train.spec import TrainSpec

_NEVER_PRINT = 10 ** 12


class DeepSpeedConfigError(UserError, ValueError):
    """`parallel.deepspeed_config` conflicts with the spec."""


def _fill(given: dict, defaults: dict) -> dict:
    """`given` with the keys it lacks taken from `defaults`, nested dicts filled the same way."""
    out = copy.deepcopy(given)
    for key, value in defaults.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _fill(out[key], value)
    return out


def spec_section(spec: TrainSpec) -> dict[str, Any]:
    """What the spec itself says in DeepSpeed's terms."""
    local_batch = spec.data.batch_size // spec.scaling.workers
    zero: dict[str, Any] = {"stage": spec.parallel.zero_stage}
    if spec.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": spec.data.batch_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": spec.optim.grad_clip_norm or 0.0,
        "zero_optimization": zero,
        # The optimizer is clipforge's AdamW (weight decay groups, bf16 state option), run inside ZeRO.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
        **precision.deepspeed_section(spec.precision),
    }


def _check(config: dict, spec: TrainSpec) -> None:
    where = "parallel.deepspeed_config"
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise DeepSpeedConfigError(f"{where}.{key}: the optimizer and learning-rate schedule come from `optim`")
    if config.get("gradient_accumulation_steps", 1) != 1:
        raise DeepSpeedConfigError(
            f"{where}.gradient_accumulation_steps must be 1: DeepSpeed sums micro-batch gradients, which is not the "
            "contrastive loss of the whole batch"
        )
    local_batch = spec.data.batch_size // spec.scaling.workers
    for key, want in (("train_micro_batch_size_per_gpu", local_batch), ("train_batch_size", spec.data.batch_size)):
        if key in config and config[key] != want:
            raise DeepSpeedConfigError(f"{where}.{key} is {config[key]}, but data.batch_size and scaling.workers "
                                       f"make it {want}")


def deepspeed_config(spec: TrainSpec) -> dict[str, Any]:
    """The config passed to deepspeed.initialize."""
    given = spec.parallel.deepspeed_config or {}
    _check(given, spec)
    return _fill(given, spec_section(spec))
