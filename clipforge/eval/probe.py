"""Linear and few-shot probes on frozen embeddings: multinomial logistic regression in torch.

The CLIP paper's protocol: an L2-regularised logistic regression on the frozen image embeddings,
its regularisation strength chosen on a validation split carved from the training images (a
log-spaced sweep), then refitted on all training images and scored once on the test images.
Fits are full-batch L-BFGS in float64 from a zero start: deterministic for the same inputs and
the same thread count. Objective: mean cross-entropy + weight_decay / 2 * |W|^2 (bias not
penalised), i.e. sklearn's LogisticRegression with C = 1 / (weight_decay * n_train).
Pure torch, no Ray.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.eval.metrics import zeroshot_metrics

PROBE_METRICS = ("acc1", "acc5", "mean_per_class_recall")


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, weight_decay: float,
                 max_iter: int = 1000) -> tuple[Tensor, Tensor]:
    """Weights [D, C] and bias [C] (float64) minimising mean cross-entropy + weight_decay/2 * |W|^2."""
    if len(x) == 0:
        raise ValueError("a probe needs at least one training example")
    x = x.double()
    y = torch.as_tensor(y, dtype=torch.long)
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def predict_logits(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.double() @ weight + bias


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(dim=1) == y).double().mean().item()


def _class_rows(y: Tensor, n_classes: int) -> list[Tensor]:
    return [torch.nonzero(y == c).flatten() for c in range(n_classes)]


def _check_classes(y: Tensor, n_classes: int, need: int, what: str) -> None:
    for c, rows in enumerate(_class_rows(y, n_classes)):
        if len(rows) < need:
            raise ValueError(f"{what}: class {c} has {len(rows)} training image(s), needs at least {need}")


def stratified_split(y: Tensor, n_classes: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train rows, validation rows): from each class, a seeded random round(val_fraction * n) (at least 1,
    leaving at least 1) go to validation."""
    _check_classes(y, n_classes, 2, "linear probe validation split")
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for rows in _class_rows(y, n_classes):
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_val = min(len(rows) - 1, max(1, round(val_fraction * len(rows))))
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def select_weight_decay(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, n_classes: int,
                        weight_decays: Sequence[float], max_iter: int) -> tuple[float, float, tuple[Tensor, Tensor]]:
    """(best weight decay, its validation acc1, its fit): ties go to the stronger regularisation."""
    best = None
    for wd in sorted(weight_decays):
        fit = fit_logistic(x_train, y_train, n_classes, wd, max_iter)
        acc = _accuracy(predict_logits(x_val, *fit), y_val)
        if best is None or acc >= best[1]:
            best = (wd, acc, fit)
    assert best is not None  # probe specs hold at least one weight decay
    return best


def _test_metrics(x_test: Tensor, y_test: Tensor, fit: tuple[Tensor, Tensor]) -> dict[str, float]:
    return zeroshot_metrics(predict_logits(x_test, *fit), y_test)


def _as_inputs(x, y) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y, dtype=torch.long)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"need embeddings [N, D] and labels [N]; got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def linear_probe(x_train, y_train, x_test, y_test, n_classes: int, weight_decays: Sequence[float],
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000) -> dict[str, float]:
    """acc1 / acc5 / mean_per_class_recall on the test set, the chosen weight decay and its validation acc1."""
    x_train, y_train = _as_inputs(x_train, y_train)
    x_test, y_test = _as_inputs(x_test, y_test)
    tr, va = stratified_split(y_train, n_classes, val_fraction, seed)
    wd, val_acc, _ = select_weight_decay(x_train[tr], y_train[tr], x_train[va], y_train[va], n_classes,
                                         weight_decays, max_iter)
    fit = fit_logistic(x_train, y_train, n_classes, wd, max_iter)
    metrics = _test_metrics(x_test, y_test, fit)
    metrics.update(weight_decay=wd, val_acc1=val_acc, n_train=len(tr), n_val=len(va), n_test=len(y_test))
    return metrics


def few_shot_sample(y: Tensor, n_classes: int, k: int, n_val: int, seed: int) -> tuple[Tensor, Tensor]:
    """(k rows per class, n_val other rows per class), drawn with `seed`. With one seed, the k-shot sample
    is the first k of a per-class permutation, so smaller samples are nested in larger ones."""
    _check_classes(y, n_classes, k + n_val, f"{k}-shot probe with {n_val} validation image(s) per class")
    g = torch.Generator().manual_seed(seed)
    shots, val = [], []
    for rows in _class_rows(y, n_classes):
        rows = rows[torch.randperm(len(rows), generator=g)]
        shots.append(rows[:k])
        val.append(rows[k : k + n_val])
    return torch.cat(shots).sort().values, torch.cat(val).sort().values


def few_shot_probe(x_train, y_train, x_test, y_test, n_classes: int, shots: Sequence[int],
                   weight_decays: Sequence[float], val_shots: int = 4, repeats: int = 1, seed: int = 0,
                   max_iter: int = 1000) -> dict[str, float]:
    """Per k in `shots`: `{k}shot_acc1`, `{k}shot_acc5`, `{k}shot_mean_per_class_recall` (means over `repeats`
    draws, seeds seed..seed+repeats-1) and `{k}shot_weight_decay` (median of the chosen ones).

    Each draw takes k training and min(k, val_shots) validation images per class; the weight decay is
    chosen on the validation images and the probe fitted on the k images only.
    """
    x_train, y_train = _as_inputs(x_train, y_train)
    x_test, y_test = _as_inputs(x_test, y_test)
    out: dict[str, float] = {}
    for k in shots:
        runs, chosen = [], []
        for r in range(repeats):
            tr, va = few_shot_sample(y_train, n_classes, k, min(k, val_shots), seed + r)
            wd, _, fit = select_weight_decay(x_train[tr], y_train[tr], x_train[va], y_train[va], n_classes,
                                             weight_decays, max_iter)
            runs.append(_test_metrics(x_test, y_test, fit))
            chosen.append(wd)
        for name in PROBE_METRICS:
            values = [m[name] for m in runs]
            out[f"{k}shot_{name}"] = math.nan if any(math.isnan(v) for v in values) else sum(values) / len(values)
        out[f"{k}shot_weight_decay"] = float(torch.tensor(chosen).median().item())
    out["n_test"] = len(y_test)
    return out
