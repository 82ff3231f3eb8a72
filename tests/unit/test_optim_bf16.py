"""AdamWBF16State: half the state of AdamW, and the same training trajectory on a small regression problem.

Stated tolerances: with fp32 weights the loss stays within 1% (relative) of torch.optim.AdamW's at every
one of 400 steps and the final weights within 10% (relative norm); with bf16 weights and stochastic
rounding the final loss is within 2% of fp32 AdamW's.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clipforge.models.adamw_bf16 import AdamWBF16State, state_bytes, stochastic_round_to_bf16

torch.set_num_threads(1)


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    w = torch.randn(32, 8, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(512, 8, generator=g)
    return x, y


def mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to(dtype)


def train(model, opt, steps: int) -> list[float]:
    x, y = problem()
    dtype = next(model.parameters()).dtype
    losses = []
    for _ in range(steps):
        loss = ((model(x.to(dtype)).float() - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


HYPER = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def test_tracks_torch_adamw_with_fp32_weights():
    ref_model, model = mlp(), mlp()
    ref = train(ref_model, torch.optim.AdamW(ref_model.parameters(), **HYPER), 400)
    ours = train(model, AdamWBF16State(model.parameters(), **HYPER), 400)
    assert ref[-1] < 0.05 * ref[0]  # the problem is actually learnt
    worst = max(abs(a - b) / b for a, b in zip(ours, ref))
    assert worst < 0.01, worst
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert ((p - q).norm() / q.norm()).item() < 0.1


def test_moments_are_bf16_and_state_is_half_of_adamw():
    ref_model, model = mlp(), mlp()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **HYPER)
    opt = AdamWBF16State(model.parameters(), **HYPER)
    train(ref_model, ref_opt, 1)
    train(model, opt, 1)
    n = sum(p.numel() for p in model.parameters())
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in opt.state.values())
    assert state_bytes(opt) == 4 * n
    assert state_bytes(ref_opt) >= 8 * n


def test_bf16_weights_need_stochastic_rounding():
    """Updates below half a bf16 step vanish with round-to-nearest weights; stochastic rounding keeps them."""
    hyper = dict(HYPER, lr=2e-4, weight_decay=0.0)
    ref_model = mlp()
    ref = train(ref_model, torch.optim.AdamW(ref_model.parameters(), **hyper), 600)
    sr_model, nearest_model = mlp(torch.bfloat16), mlp(torch.bfloat16)
    sr = train(sr_model, AdamWBF16State(sr_model.parameters(), **hyper), 600)
    nearest = train(nearest_model, AdamWBF16State(nearest_model.parameters(), stochastic_rounding=False, **hyper), 600)
    assert abs(sr[-1] - ref[-1]) / ref[-1] < 0.02, (sr[-1], ref[-1])
    assert nearest[-1] > 1.5 * ref[-1], (nearest[-1], ref[-1])
    assert all(p.dtype == torch.bfloat16 for p in sr_model.parameters())


def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
    x = torch.full((200_000,), 1.0 + 2**-10)  # an eighth of the way from 1 to the next bf16, 1 + 2**-7
    rounded = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert x.bfloat16().float().mean().item() == 1.0  # round-to-nearest loses it
    exact = torch.tensor([0.0, -2.0, 1.5, 3.140625, float("inf"), -float("inf")])
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)
    assert stochastic_round_to_bf16(torch.tensor([float("nan")])).isnan().all()


def test_state_dict_round_trip_keeps_bf16_moments_and_training_continues():
    model = mlp()
    opt = AdamWBF16State(model.parameters(), **HYPER)
    first = train(model, opt, 50)
    saved = opt.state_dict()
    resumed = AdamWBF16State(model.parameters(), **HYPER)
    resumed.load_state_dict(saved)
    for before, after in zip(opt.state.values(), resumed.state.values()):
        assert after["exp_avg"].dtype == torch.bfloat16 and torch.equal(after["exp_avg"], before["exp_avg"])
        assert after["step"] == before["step"] == 50
    later = train(model, resumed, 50)
    assert later[-1] < first[-1]


def test_bad_hyperparameters_are_errors():
    params = mlp().parameters()
    for bad in (dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=0.0), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            AdamWBF16State(params, **bad)
