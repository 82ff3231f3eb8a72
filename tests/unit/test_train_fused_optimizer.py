# .venv/bin/python -m pytest -q tests/unit/test_train_fused_optimizer.py  ->  a few seconds, no Ray
"""The trainer's AdamW runs on torch's fused kernel where parameters are plain tensors of the process.

The fused kernel must give the per-parameter loop's updates (to rounding), keep the weight-decay groups
and hyper-parameters, and a checkpoint's optimizer state must resume on the loading run's own kernel,
whichever kernel wrote it (torch's load_state_dict would otherwise take the writer's flags).
"""
from __future__ import annotations

import copy

import torch

from clipforge.models import ModelSpec, create_model
from clipforge.train.optimizer import build_optimizer, with_kernel_flags_of
from clipforge.train.strategy import build_strategy

from train_fixtures import train_spec


def _spec(tmp_path):
    return train_spec(str(tmp_path / "run"), ["unused.tar"], optim={"lr": 1e-2, "weight_decay": 0.1},
                      scaling={"workers": 1})


def _train_both(model, optimizer, twin, twin_optimizer, steps: int, seed: int = 0) -> None:
    """`steps` updates of both models with `model`'s gradients.

    The same gradients go to both: Adam scales every gradient to about the learning rate, so rounding noise
    in a gradient that should be zero (a key bias's) would otherwise become lr-sized differences.
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = torch.randn(4, 3, *model.visual.image_size, generator=g)
        tokens = torch.randint(1, 100, (4, model.context_length), generator=g)
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, scale = model(images, tokens)
        (-(image_features * text_features).sum() * scale).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        optimizer.step()
        twin_optimizer.step()


def _largest_difference(model, twin) -> float:
    return max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters()))


def test_single_process_trainer_steps_on_the_fused_kernel_with_the_loops_updates(tmp_path):
    torch.manual_seed(0)
    model = create_model(ModelSpec(name="tiny", trainable="all")).model.train()
    reference = copy.deepcopy(model)
    spec = _spec(tmp_path)
    par = build_strategy(model, spec)
    loop = build_optimizer(reference, spec.optim)
    assert all(g["fused"] for g in par.optimizer.param_groups)
    assert not any(g["fused"] for g in loop.param_groups)
    # Same groups, same hyper-parameters: only the kernel differs.
    kernel = ("fused", "foreach", "params")
    assert [{k: v for k, v in g.items() if k not in kernel} for g in par.optimizer.param_groups] == \
        [{k: v for k, v in g.items() if k not in kernel} for g in loop.param_groups]
    assert [len(g["params"]) for g in par.optimizer.param_groups] == [len(g["params"]) for g in loop.param_groups]
    _train_both(model, par.optimizer, reference, loop, 5)
    assert _largest_difference(model, create_model(ModelSpec(name="tiny", trainable="all")).model) > 1e-2
    assert _largest_difference(model, reference) < 1e-6  # the loop's updates, to rounding


def test_checkpoint_state_resumes_on_the_loading_runs_kernel(tmp_path):
    torch.manual_seed(0)
    spec = _spec(tmp_path)
    writer_model = create_model(ModelSpec(name="tiny", trainable="all")).model.train()
    writer = build_optimizer(writer_model, spec.optim)  # the loop kernel, as another strategy would write it
    before = copy.deepcopy(writer_model)
    _train_both(writer_model, writer, before, build_optimizer(before, spec.optim), 2)
    saved = copy.deepcopy(writer.state_dict())  # as read back from a checkpoint: not the writer's live tensors
    assert saved["param_groups"][0]["fused"] is None

    model = copy.deepcopy(writer_model)
    par = build_strategy(model, spec)
    par.state.load_optimizer_state(saved)
    assert all(g["fused"] is True for g in par.optimizer.param_groups)  # not the writer's None
    assert par.optimizer.state_dict()["state"][0]["exp_avg"].equal(saved["state"][0]["exp_avg"])
    _train_both(model, par.optimizer, writer_model, writer, 3, seed=1)
    assert _largest_difference(model, before) > 1e-2
    assert _largest_difference(model, writer_model) < 1e-6  # continues the saved moments as the writer does

    # And the other way: fused state into an optimizer on the loop kernel keeps the loop.
    loop = build_optimizer(copy.deepcopy(writer_model), spec.optim)
    loop.load_state_dict(with_kernel_flags_of(loop, par.optimizer.state_dict()))
    assert not any(g["fused"] for g in loop.param_groups)


def test_the_bf16_state_optimizer_is_kept_when_the_fused_kernel_is_asked_for(tmp_path):
    from clipforge.models.adamw_bf16 import AdamWBF16State

    model = create_model(ModelSpec(name="tiny", trainable="all")).model
    spec = _spec(tmp_path).optim.model_copy(update={"state_dtype": "bf16"})
    assert type(build_optimizer(model, spec, fused=True)) is AdamWBF16State
