"""Gradient accumulation for contrastive losses: k micro-batches give the gradient of one k-times-larger batch.

Summing per-micro-batch gradients would be wrong for a contrastive loss: each micro-batch would only
see its own negatives. Instead (as OpenCLIP does) the features of all micro-batches are first computed
without gradient and cached; then each micro-batch is run again with gradient and its live features
are scored together with the cached features of the others. Micro-batch j's backward pass yields
exactly the part of the big-batch gradient that flows through micro-batch j's features, so the sum over
j is the big-batch gradient, while only one micro-batch's activations are held at a time.

The temperature (and logit bias) are model outputs too; their gradient is the same in every pass, so
they carry gradient in one pass only (the last). OpenCLIP lets every pass contribute and so scales the
temperature's gradient by k; here the accumulated step equals the big batch exactly.

The model must compute the same features in both passes: dropout must be off (or its randomness
replayed), and BatchNorm layers in training mode see each micro-batch twice.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch


def _features(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, dict):
        keys = ["image_features", "text_features", "logit_scale"] + (["logit_bias"] if "logit_bias" in out else [])
        return tuple(out[k] for k in keys)
    if not isinstance(out, (tuple, list)) or len(out) < 3:
        raise ValueError(
            "the model must return (image_features, text_features, logit_scale[, logit_bias]); got "
            f"{type(out).__name__}"
        )
    return tuple(out)


def accumulated_step(model_forward: Callable[..., object], micro_batches: Sequence[Sequence[torch.Tensor]],
                     loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Backward of `loss_fn` on the concatenation of `micro_batches`, one micro-batch's activations at a time.

    model_forward(*micro_batch) -> (image_features, text_features, logit_scale[, logit_bias]); when it is
    a DistributedDataParallel module, gradients are synchronised once, in the last pass. Gradients are
    added to the parameters' .grad (zero them before, step the optimizer after). Returns the detached
    loss of the whole accumulated batch.
    """
    if not micro_batches:
        raise ValueError("accumulated_step needs at least one micro-batch")
    with torch.no_grad():
        cached = [_features(model_forward(*batch)) for batch in micro_batches]
    images = [c[0] for c in cached]
    texts = [c[1] for c in cached]
    last = len(micro_batches) - 1
    no_sync = getattr(model_forward, "no_sync", None)
    for j, batch in enumerate(micro_batches):
        # DDP synchronises gradients in the last pass only (a model without no_sync does so in every pass).
        with no_sync() if no_sync is not None and j != last else contextlib.nullcontext():
            out = _features(model_forward(*batch))
            if out[0].shape != images[j].shape or out[1].shape != texts[j].shape:
                raise RuntimeError(f"micro-batch {j}: features changed shape between the caching and the live pass")
            image = torch.cat(images[:j] + [out[0]] + images[j + 1:])
            text = torch.cat(texts[:j] + [out[1]] + texts[j + 1:])
            # Scale and bias: gradient from the last pass only (it is the same in every pass). Keeping it in
            # the synchronised pass also means every parameter takes part in DDP's reduction.
            rest = out[2:] if j == last else tuple(t.detach() for t in out[2:])
            loss = loss_fn(image, text, *rest)
            loss.backward()
    # micro_batches is not empty (checked above), so `loss` is the last pass's: that of the whole batch.
    return loss.detach()
