"""Parameters and multiply-accumulates per sample of a model, for the compute axis of scaling plots.

Compute of a run = GMACs of one forward pass of one (image, caption) pair x samples seen, as in
Cherti et al. A run's summary.json may record `params` and `gmacs`; otherwise the model named in
its spec is built once (in a background thread, so pages never wait for it) and its forward pass
counted with torch's FLOP counter. Only architecture names are built, never config paths taken
from a run folder.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCost:
    params: int
    gmacs: float  # per (image, caption) pair, forward pass


def _counter():
    """torch's FLOP counter, also counting the fused CPU attention kernel that it has no formula for."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    custom = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

        custom[cpu_attention] = cpu_attention_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def estimate_model_cost(model_name: str) -> ModelCost:
    """Build `model_name` (random or packaged weights, no checkpoint) and count one forward pass."""
    import torch

    from clipforge.models import create_model
    from clipforge.models.spec import ModelSpec

    bundle = create_model(ModelSpec(name=model_name))
    model = bundle.model
    size = model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    image = torch.zeros(1, 3, height, width)
    tokens = bundle.tokenizer(["a photo of a cat"])
    params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    # With gradients on, nn.MultiheadAttention takes its regular path (linear layers + attention) instead of
    # the fused inference kernel, which the counter cannot see into.
    with torch.enable_grad(), _counter() as counter:
        model.encode_image(image)
        model.encode_text(tokens)
    # The counter reports FLOPs of matrix products, convolutions and attention: one multiply-accumulate is two.
    return ModelCost(params=int(params), gmacs=counter.get_total_flops() / 2e9)


def _buildable(name: str) -> bool:
    return bool(name) and not name.endswith(".json") and "/" not in name and "\\" not in name and ":" not in name


class ModelCosts:
    """Estimates shared by all requests: `get` answers at once and queues unknown models for one worker."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._known: dict[str, ModelCost | None] = {}
        self._errors: dict[str, str] = {}
        self._queue: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None

    def get(self, model_name: str | None) -> ModelCost | None:
        if not isinstance(model_name, str) or not self.enabled:
            return None  # a spec may name its model with a number: nothing to build
        if model_name in self._known:  # without the lock (entries are only added): a listing asks once per run
            return self._known[model_name]
        if not _buildable(model_name):
            return None
        with self._lock:
            if model_name in self._known:
                return self._known[model_name]
            if model_name not in self._queue:
                self._queue.append(model_name)
                self._start_worker()
                self._wake.notify()
        return None

    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._queue)

    def wait(self, timeout: float) -> bool:
        """Block until no estimate is queued (used by benchmarks and tests); True if the queue emptied."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._queue, timeout)

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="model-cost-estimates", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._wake:
                if not self._wake.wait_for(lambda: bool(self._queue), timeout=60):
                    self._worker = None
                    return
                name = self._queue[0]
            try:
                cost: ModelCost | None = estimate_model_cost(name)
                error = None
            except Exception as e:  # noqa: BLE001 - an unknown or unbuildable model leaves the cells blank
                cost, error = None, f"{type(e).__name__}: {e}"
                log.warning("cannot estimate the cost of model %r: %s", name, error)
            with self._wake:
                self._known[name] = cost
                if error:
                    self._errors[name] = error
                self._queue.remove(name)
                self._wake.notify_all()
