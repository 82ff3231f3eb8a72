"""`debug.log_sample_keys`: which samples every rank trained on in every step, in STORAGE/sample_keys.jsonl.

Rank 0 gathers every rank's keys after each step and writes them (one writer, so the file needs no locking
and works on object stores). Each attempt (the first run and every restart) begins with a line naming its
start step; the lines of an attempt that was cut off stay, and readers let the attempt that resumed from
step S supersede every earlier line of a step after S (`clipforge.runtime.run_dir.read_sample_keys`), so
the file shows both what a failed attempt consumed and what the run finally trained on.

Object stores cannot append: there the whole file is rewritten, before every checkpoint (so every step up to
the step a later attempt resumes from is stored before that checkpoint exists), at the end and at most once
a minute in between. A local file gets every line at once.
"""
from __future__ import annotations

import json
import time
import uuid

import fsspec

from clipforge.runtime.fs_files import is_local, write_text
from clipforge.runtime.run_dir import read_sample_key_lines, sample_keys_path

# Object stores: the longest time lines wait in memory between checkpoints.
_REWRITE_EVERY_S = 60.0


class SampleKeyLog:
    """STORAGE/sample_keys.jsonl as one attempt of a run writes it (rank 0 only)."""

    def __init__(self, storage: str, start_step: int, restarts: int, resumed: bool):
        """`resumed`: the attempt continues from a checkpoint, so the lines of earlier attempts are kept; a run
        that starts from scratch starts the file anew."""
        self.path = sample_keys_path(storage)
        self.local = is_local(self.path)
        self.attempt = uuid.uuid4().hex[:12]
        # Earlier attempts' lines, read back whole: a line cut off by a killed writer is dropped, so that the
        # lines of this attempt start on lines of their own.
        earlier = read_sample_key_lines(storage) if resumed and _exists(self.path) else []
        # Object stores: every line of the file, rewritten whole; local files: appended to, nothing kept here.
        self.lines = [json.dumps(record, sort_keys=True) for record in earlier]
        self.lines.append(json.dumps({"attempt": self.attempt, "start_step": start_step, "restarts": restarts,
                                      "time": time.time()}, sort_keys=True))
        self.pending = False  # lines recorded but not yet in the file (object stores)
        self.rewritten_at = 0.0
        self._rewrite()
        if self.local:
            self.lines = []

    def record(self, step: int, epoch: int, keys_per_rank: list[list[str]]) -> None:
        """The keys every rank trained on in `step` (of `epoch`, counted from 1), one line per rank."""
        new = [json.dumps({"attempt": self.attempt, "step": step, "epoch": epoch, "rank": rank, "keys": keys},
                          sort_keys=True)
               for rank, keys in enumerate(keys_per_rank)]
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in new))
            return
        self.lines.extend(new)
        self.pending = True
        if time.monotonic() - self.rewritten_at >= _REWRITE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Make sure the file holds every line recorded so far (local files always do)."""
        if self.pending:
            self._rewrite()

    def _rewrite(self) -> None:
        write_text(self.path, "".join(line + "\n" for line in self.lines))
        self.pending = False
        self.rewritten_at = time.monotonic()


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)
