"""The driver's progress bar: it follows STORAGE/metrics.jsonl while the workers train.

The workers write the log anyway, so the bar needs no extra channel from them and works the same
for local and remote run directories. It is shown only when its stream is a terminal.
"""
from __future__ import annotations

import json
import sys
import threading
from typing import TextIO

import fsspec
from tqdm import tqdm

from clipforge.runtime.fs_files import is_local
from clipforge.runtime.run_dir import metrics_path
from clipforge.train.monitoring import worker_file


class MetricsProgress:
    """A tqdm bar over training steps, fed by polling the metrics log from a background thread."""

    def __init__(self, storage: str, name: str, stream: TextIO | None = None, poll_seconds: float | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.metrics_path = metrics_path(storage)
        self.rank0_path = worker_file(storage, 0)
        # Remote logs are re-read whole on each poll: poll them less often.
        self.poll_seconds = poll_seconds if poll_seconds is not None else (0.5 if is_local(storage) else 5.0)
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bar: tqdm | None = None

    def __enter__(self) -> "MetricsProgress":
        if self.enabled:
            self.bar = tqdm(total=None, unit="step", desc=self.name, file=self.stream, dynamic_ncols=True)
            self._thread = threading.Thread(target=self._run, name="train-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self.poll()  # the final state
        if self.bar is not None:
            self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a display must never stop training; try again next poll
                continue

    def _read(self, path: str) -> str | None:
        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def poll(self) -> None:
        """Show the newest step, loss and throughput of the log (and the total once rank 0 has said it)."""
        if self.bar is None:
            return
        if self.bar.total is None:
            info = self._read(self.rank0_path)
            total = json.loads(info).get("total_steps") if info else None
            if isinstance(total, int):
                self.bar.total = total
        text = self._read(self.metrics_path) or ""
        last = None
        for line in reversed(text.splitlines()):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if isinstance(rec, dict) and "loss" in rec:
                last = rec
                break
        if last is None:
            return
        self.bar.n = int(last.get("step", 0))
        post = {"loss": f"{last['loss']:.4f}"}
        if isinstance(last.get("samples_per_second"), (int, float)):
            post["samples/s"] = f"{last['samples_per_second']:.1f}"
        if last.get("restarts"):
            post["restarts"] = last["restarts"]
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()
