"""AdamW with bfloat16 optimizer state: 4 bytes of state per parameter instead of fp32 AdamW's 8.

The two moment estimates are stored in bfloat16 and widened to fp32 for each update. Rounding them
back to nearest would bias them: with beta2 = 0.999 an update changes the second moment by ~0.1%, less
than half a bfloat16 step (0.4%), so it would round back to the old value and the estimate would stop
tracking the gradients. They are therefore rounded stochastically (up with probability equal to the
distance from the lower neighbour), which is unbiased. Parameters that are themselves bfloat16 are
updated in fp32 and written back with stochastic rounding as well, so that updates smaller than half
a bfloat16 step still move the weight in expectation; fp32 parameters are updated in place, exactly.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

_LOW_BITS = 1 << 16
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as a signed 32-bit integer


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random with probabilities that make the result unbiased.

    A bfloat16 is the top 16 bits of a float32: adding uniform noise to the 16 bits that are cut off
    and then truncating rounds the magnitude up exactly when the noise carries into the kept bits.
    """
    x = x.float().contiguous()
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((x.view(torch.int32) + noise) & _HIGH_MASK).view(torch.float32)
    # Inf and NaN keep their nearest conversion (the noise could turn an infinity's bit pattern into NaN).
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


class AdamWBF16State(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with bfloat16 moment buffers.

    `stochastic_rounding=False` rounds state and bf16 weights to nearest instead (biased; for comparison).
    `seed` makes the rounding noise reproducible.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, stochastic_rounding: bool = True, seed: int = 0):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed + len(self._generators))
            self._generators[device] = g
        return self._generators[device]

    def _to_bf16(self, x: torch.Tensor) -> torch.Tensor:
        if self.stochastic_rounding:
            return stochastic_round_to_bf16(x, self._generator(x.device))
        return x.to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16State does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias1 = 1 - beta1 ** step
                bias2 = 1 - beta2 ** step
                weights = p if p.dtype == torch.float32 else p.float()
                weights.mul_(1 - lr * wd)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
                weights.addcdiv_(exp_avg, denom, value=-lr / bias1)
                if weights is not p:
                    p.copy_(self._to_bf16(weights) if p.dtype == torch.bfloat16 else weights)
                state["exp_avg"].copy_(self._to_bf16(exp_avg))
                state["exp_avg_sq"].copy_(self._to_bf16(exp_avg_sq))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded floating-point state to each parameter's dtype; the moments stay bfloat16.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)
            if "step" in state:
                state["step"] = int(state["step"])


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state tensors."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
