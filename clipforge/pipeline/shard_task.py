"""One shard of a build: download and process its rows on a thread pool, then commit its files.

`iter_build_shard` is the body of one Ray generator task: it yields small progress events while it
works (so the driver's progress bar moves within a shard) and the shard summary last. It has no Ray
dependency itself; `build_shard` runs it in-process.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterator

from clipforge.pipeline import status as st
from clipforge.pipeline.fetch import Fetcher
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.ratelimit import Limiter
from clipforge.pipeline.sample import InputRow, RowOutcome, SampleSettings, process_row
from clipforge.pipeline.shard_writer import ShardWriter

PROGRESS_EVERY_S = 1.0


@dataclass
class ShardJob:
    shard: int
    rows: list[InputRow]


@dataclass
class ShardProgress:
    """Rows finished (and how many of them ok) since the previous event of the same shard."""

    shard: int
    rows: int
    ok: int


def _straggler_allowance(settings: SampleSettings, rows: int) -> int:
    cut = settings.download.straggler
    return 0 if cut is None else max(1, math.floor(cut.max_remaining_fraction * rows))


def iter_build_shard(job: ShardJob, settings: SampleSettings, output_path: str, digits: int,
                     extra_cols: list[str], storage_options: dict[str, Any] | None = None,
                     limiter: Limiter | None = None) -> Iterator[ShardProgress | dict[str, Any]]:
    """Process every row and commit the shard; yields ShardProgress events, then the summary dict.

    With `download.straggler` set, the shard commits without its last few rows (as
    `skipped_straggler`) once only that many are left and none has finished for `stuck_seconds`.
    Their threads are abandoned, not joined: each ends by itself within its download deadline.
    """
    layout = OutputLayout(output_path, storage_options)
    writer = ShardWriter(layout, job.shard, settings.output.image_format, digits, extra_cols)
    threads = max(1, min(settings.download.threads_per_worker, len(job.rows)))
    # At most two rows per thread are in flight or finished-but-unwritten: bounds memory for big images.
    window = 2 * threads
    allowance = _straggler_allowance(settings, len(job.rows))
    stuck_s = settings.download.straggler.stuck_seconds if allowance else None
    rows_since = ok_since = 0
    last = last_done = time.monotonic()
    pool = ThreadPoolExecutor(threads, "fetch")
    try:
        with Fetcher(settings.download, limiter=limiter) as fetcher:
            todo = iter(enumerate(job.rows))
            submitted = 0
            pending: dict[Future, tuple[int, InputRow]] = {}
            while True:
                for index, row in todo:
                    pending[pool.submit(process_row, row, index, fetcher, settings)] = (index, row)
                    submitted += 1
                    if len(pending) >= window:
                        break
                if not pending:
                    break
                timeout = None  # only a finished row can change anything...
                if stuck_s is not None and submitted == len(job.rows) and len(pending) <= allowance:
                    timeout = max(0.0, stuck_s - (time.monotonic() - last_done))  # ...or the cutoff moment
                done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                for fut in done:
                    del pending[fut]
                    outcome = fut.result()
                    writer.add(outcome)
                    rows_since += 1
                    ok_since += outcome.ok
                now = time.monotonic()
                if done:
                    last_done = now
                elif (stuck_s is not None and submitted == len(job.rows) and len(pending) <= allowance
                      and now - last_done >= stuck_s):
                    waited = now - last_done
                    for fut, (index, row) in pending.items():
                        fut.cancel()
                        writer.add(RowOutcome(row, index, st.SKIPPED_STRAGGLER,
                                              f"no answer after {waited:.1f} s while the rest of the shard was done"))
                        rows_since += 1
                    pending.clear()
                    break
                if now - last >= PROGRESS_EVERY_S:
                    yield ShardProgress(job.shard, rows_since, ok_since)
                    rows_since = ok_since = 0
                    last = now
        pool.shutdown(wait=False, cancel_futures=True)
        summary = writer.commit()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        writer.discard()
        raise
    yield summary


def build_shard(job: ShardJob, settings: SampleSettings, output_path: str, digits: int,
                extra_cols: list[str], storage_options: dict[str, Any] | None = None,
                limiter: Limiter | None = None) -> dict[str, Any]:
    """Run one shard to completion in this process and return its summary."""
    result: dict[str, Any] = {}
    for event in iter_build_shard(job, settings, output_path, digits, extra_cols, storage_options, limiter):
        if isinstance(event, dict):
            result = event
    return result
