"""Numeric precision of training, per `precision.mode`.

  fp32       everything in fp32;
  amp_bf16   fp32 weights and optimizer; the forward runs under autocast in bf16 (fsdp2: parameters are
             also gathered in bf16, gradients reduced in `reduce_dtype`);
  amp_fp16   the same in fp16, with a dynamic gradient scaler (its state is saved in checkpoints);
  pure_bf16  the trained module itself is cast to bf16 (weights, gradients, optimizer moments follow).

The loss always runs in fp32 on fp32 features. DeepSpeed applies precision itself (see `deepspeed_section`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from clipforge.train.spec import PrecisionSpec

HALF = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16, "pure_bf16": torch.bfloat16}


def is_amp(spec: PrecisionSpec) -> bool:
    return spec.mode in ("amp_bf16", "amp_fp16")


def autocast(spec: PrecisionSpec, device: torch.device):
    """Autocast for the forward pass of amp modes; nothing otherwise."""
    if not is_amp(spec):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=HALF[spec.mode])


def cast_module(module: nn.Module, spec: PrecisionSpec) -> nn.Module:
    """pure_bf16: the module's floating-point parameters and buffers in bf16; otherwise unchanged."""
    return module.to(torch.bfloat16) if spec.mode == "pure_bf16" else module


def input_dtype(spec: PrecisionSpec) -> torch.dtype | None:
    """The dtype floating-point inputs must have (a bf16 module takes bf16 images and features)."""
    return torch.bfloat16 if spec.mode == "pure_bf16" else None


def cast_inputs(inputs: tuple, spec: PrecisionSpec) -> tuple:
    dtype = input_dtype(spec)
    if dtype is None:
        return inputs
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def grad_scaler(spec: PrecisionSpec, device: torch.device, sharded: bool = False) -> torch.amp.GradScaler | None:
    """amp_fp16's dynamic loss scaler (fp16 gradients underflow without it); None for other modes.

    `sharded`: the gradients are FSDP2's shards, and each rank sees only its own: overflow must be agreed on
    by all ranks (ShardedGradScaler).
    """
    if spec.mode != "amp_fp16":
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, init_scale=spec.init_scale)
    return torch.amp.GradScaler(device.type, init_scale=spec.init_scale)


def mixed_precision_policy(spec: PrecisionSpec):
    """FSDP2's policy: amp modes gather parameters in half precision and reduce in `reduce_dtype`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not is_amp(spec):
        return MixedPrecisionPolicy()
    reduce = torch.float32 if spec.reduce_dtype == "fp32" else torch.bfloat16
    return MixedPrecisionPolicy(param_dtype=HALF[spec.mode], reduce_dtype=reduce)


def deepspeed_section(spec: PrecisionSpec) -> dict:
    """The DeepSpeed config keys of this precision.

    amp modes use DeepSpeed's torch autocast (fp32 weights; fp16 with its gradient scaler); pure_bf16 is
    DeepSpeed's bf16 mode (bf16 module, fp32 master weights inside its ZeRO optimizer).
    """
    if spec.mode == "amp_bf16":
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    if spec.mode == "amp_fp16":
        return {"torch_autocast": {"enabled": True, "dtype": "float16"}}
    if spec.mode == "pure_bf16":
        return {"bf16": {"enabled": True}}
    return {}
