# nice -n 15 .venv/bin/python benchmarks/optimizer_memory.py  ->  benchmarks/results/optimizer_memory.json and the line `RESULT optimizer_memory: ...` (optimizer state bytes per parameter: torch AdamW vs AdamWBF16State on the from-scratch Mini-CLIP; under a minute)
"""Optimizer state memory per parameter: torch.optim.AdamW (fp32 moments) vs AdamWBF16State (bf16 moments).

Both optimizers take one step on the same model (`miniclip-vit-scratch`, 19M parameters, built from
config with random weights) and the bytes of every tensor in their per-parameter state are summed.
A short regression run also records how closely the bf16-state optimizer tracks fp32 AdamW.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_report import result_line, write_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "optimizer_memory.json"
TARGET = 0.5


def _one_step_state(model, make_optimizer) -> tuple[int, float]:
    import torch

    from clipforge.models.adamw_bf16 import state_bytes

    opt = make_optimizer(p for p in model.parameters() if p.requires_grad)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    t0 = time.perf_counter()
    opt.step()
    seconds = time.perf_counter() - t0
    return state_bytes(opt), seconds


def _tracking(steps: int) -> dict:
    """Max relative loss gap over a regression run, AdamWBF16State vs torch AdamW (fp32 weights)."""
    import torch
    from torch import nn

    from clipforge.models.adamw_bf16 import AdamWBF16State

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 8, generator=g))
    curves = {}
    for name, cls in (("adamw", torch.optim.AdamW), ("adamw_bf16_state", AdamWBF16State)):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
        opt = cls(model.parameters(), lr=3e-3, weight_decay=0.01)
        curve = []
        for _ in range(steps):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[name] = curve
    gaps = [abs(a - b) / b for a, b in zip(curves["adamw_bf16_state"], curves["adamw"])]
    return {"steps": steps, "final_loss_adamw": curves["adamw"][-1],
            "final_loss_adamw_bf16_state": curves["adamw_bf16_state"][-1], "max_relative_loss_gap": max(gaps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="miniclip-vit-scratch")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    import torch

    from clipforge.models import ModelSpec, create_model
    from clipforge.models.adamw_bf16 import AdamWBF16State

    torch.set_num_threads(1)
    model = create_model(ModelSpec(name=args.model)).model
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fp32_bytes, fp32_seconds = _one_step_state(model, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))
    bf16_bytes, bf16_seconds = _one_step_state(model, lambda ps: AdamWBF16State(ps, lr=1e-3))
    ratio = bf16_bytes / fp32_bytes
    report = {
        "model": args.model,
        "parameters": n,
        "adamw_fp32": {"state_bytes": fp32_bytes, "bytes_per_parameter": fp32_bytes / n, "step_seconds": fp32_seconds},
        "adamw_bf16_state": {"state_bytes": bf16_bytes, "bytes_per_parameter": bf16_bytes / n,
                             "step_seconds": bf16_seconds},
        "ratio": ratio,
        "target": TARGET,
        "pass": ratio <= TARGET,
        "tracking": _tracking(400),
        "notes": "torch AdamW keeps a 4-byte step tensor per parameter tensor on top of its two fp32 moments; "
                 "AdamWBF16State keeps its step count as a Python int.",
    }
    out = write_report(args.out, report)
    print(f"{args.model}: {n} parameters; state bytes/param: AdamW {fp32_bytes / n:.3f}, "
          f"AdamWBF16State {bf16_bytes / n:.3f}; loss gap on regression {report['tracking']['max_relative_loss_gap']:.4f} "
          f"->  {out}")
    print(result_line("optimizer_memory", ratio, TARGET, report["pass"]))


if __name__ == "__main__":
    main()
