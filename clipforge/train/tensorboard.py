"""TensorBoard event files of a run's metrics, in STORAGE/tensorboard.

Every numeric field of a metrics line (eval results included) becomes a scalar at the line's step.
Object stores cannot append, so for remote storage the events are written to a local folder and
copied up whenever `flush` is called (at checkpoints and at the end).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile

import fsspec

from clipforge.runtime.fs_files import is_local, join
from clipforge.runtime.run_dir import TENSORBOARD_DIR

log = logging.getLogger(__name__)

# Fields that are axes or bookkeeping, not curves.
_NOT_SCALARS = {"step", "epoch", "time", "restarts"}


def scalars(record: dict) -> dict[str, float]:
    """The fields of a metrics line that TensorBoard should plot."""
    return {k: float(v) for k, v in record.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLog:
    """Writes metrics lines as scalars; `resume_step` hides the events a cut-off attempt logged after it."""

    def __init__(self, storage: str, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.target = join(storage, TENSORBOARD_DIR)
        self.local = is_local(storage)
        self._tmp = None if self.local else tempfile.TemporaryDirectory(prefix="clipforge-tb-")
        logdir = self.target if self._tmp is None else self._tmp.name
        # purge_step: TensorBoard drops events at or after this step from earlier event files.
        self.writer = SummaryWriter(logdir, purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, record: dict) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step, walltime=record.get("time"))

    def flush(self) -> None:
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self._tmp is not None:
            fs, target = fsspec.core.url_to_fs(self.target)
            for name in os.listdir(self._tmp.name):
                fs.put_file(os.path.join(self._tmp.name, name), f"{target.rstrip('/')}/{name}")

    def close(self) -> None:
        self.writer.close()
        self._upload()
        if self._tmp is not None:
            self._tmp.cleanup()


def open_tensorboard(storage: str, resume_step: int | None) -> TensorBoardLog | None:
    """A writer, or None (with a warning) when the `tensorboard` package is not installed."""
    try:
        return TensorBoardLog(storage, resume_step)
    except ImportError as e:
        log.warning("TensorBoard events are not written (%s): install the `tensorboard` package or set "
                    "`tensorboard: false`", e)
        return None
