"""One shard of a build: download and process its rows on a thread pool, then commit its files.

`iter_build_shard` is the body of one Ray generator task: it yields small progress events while it
works (so the driver's progress bar moves within a shard) and the shard summary last. It has no Ray
dependency itself; `build_shard` runs it in-process.

A shard whose driver is gone is never committed: with a `DriverFence` the task checks, at every
progress tick and right before the commit, that the build's driver still runs (see `driver_fence.py`).
"""
from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from clipforge.pipeline import status as st
from clipforge.pipeline.driver_fence import DriverFence, DriverGone
from clipforge.pipeline.fetch import Fetcher, FetchFailed
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.ratelimit import Limiter
from clipforge.pipeline.sample import InputRow, RowOutcome, SampleSettings, process_row
from clipforge.pipeline.shard_patch import ShardPatch
from clipforge.pipeline.shard_writer import ShardWriter

PROGRESS_EVERY_S = 1.0
FETCH_THREAD_PREFIX = "shard-fetch"


@dataclass
class ShardJob:
    shard: int
    rows: list[InputRow]
    # Set when only some rows of an already committed shard are downloaded again (`incremental: retry_failed`):
    # the position of each of `rows` in its shard, which its sample key is built from. None: `rows` is the shard.
    positions: list[int] | None = None

    def indexed_rows(self) -> list[tuple[int, InputRow]]:
        """(position in the shard, row) for every row of the job."""
        if self.positions is None:
            return list(enumerate(self.rows))
        return list(zip(self.positions, self.rows))

    def writer(self, layout: OutputLayout, image_format: str, digits: int, extra_cols: list[str]) -> ShardWriter:
        """A writer of a new shard, or for a patch one that keeps the shard's other rows."""
        if self.positions is None:
            return ShardWriter(layout, self.shard, image_format, digits, extra_cols)
        redo = {row.row: pos for pos, row in self.indexed_rows()}
        return ShardPatch(layout, self.shard, image_format, digits, extra_cols, redo)


@dataclass
class ShardProgress:
    """Rows finished (and how many of them ok) since the previous event of the same shard."""

    shard: int
    rows: int
    ok: int


class _FetchThreads:
    """A fixed set of daemon threads running rows, and a stop flag for the rows a shard gives up on.

    Not a ThreadPoolExecutor: the interpreter joins its threads at exit, so one download stuck in a
    socket read would keep a finished worker process alive (and its connection open) until every
    timeout and retry of that download had run out. These threads never hold the process, and once
    `stop()` is called their downloads end at their next request (a retry or a redirect hop): the
    fetcher asks `limiter` before every request, and it refuses from then on.
    """

    def __init__(self, count: int, limiter: Limiter | None):
        self.stopped = threading.Event()
        self._inner_limiter = limiter
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{FETCH_THREAD_PREFIX}-{i}", daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def limiter(self, host: str) -> None:
        if self.stopped.is_set():
            raise FetchFailed(st.SKIPPED_STRAGGLER, "the shard ended without this row")
        if self._inner_limiter is not None:
            self._inner_limiter(host)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Queued rows never start, running ones end at their next request, idle threads exit."""
        self.stopped.set()
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if self.stopped.is_set():
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)


def _straggler_allowance(settings: SampleSettings, rows: int) -> int:
    cut = settings.download.straggler
    return 0 if cut is None else max(1, math.floor(cut.max_remaining_fraction * rows))


def _check_driver(fence: DriverFence | None, shard: int) -> None:
    if fence is not None and not fence.driver_alive():
        raise DriverGone(f"shard {shard}: the build's driver (pid {fence.pid}) has ended; the shard is not committed")


def iter_build_shard(job: ShardJob, settings: SampleSettings, output_path: str, digits: int,
                     extra_cols: list[str], storage_options: dict[str, Any] | None = None,
                     limiter: Limiter | None = None,
                     fence: DriverFence | None = None) -> Iterator[ShardProgress | dict[str, Any]]:
    """Process every row and commit the shard (or, for a patch job, rewrite it with the fresh outcomes of its
    rows); yields ShardProgress events, then the summary dict.

    With `download.straggler` set, the shard commits without its last few rows (as
    `skipped_straggler`) once only that many are left and none has finished for `stuck_seconds`.
    Their downloads are not waited for: they stop at their next request and never hold the process.
    """
    layout = OutputLayout(output_path, storage_options)
    writer = job.writer(layout, settings.output.image_format, digits, extra_cols)
    threads = max(1, min(settings.download.threads_per_worker, len(job.rows)))
    # At most two rows per thread are in flight or finished-but-unwritten: bounds memory for big images.
    window = 2 * threads
    allowance = _straggler_allowance(settings, len(job.rows))
    straggler = settings.download.straggler
    stuck_s = straggler.stuck_seconds if straggler is not None and allowance else None
    rows_since = ok_since = 0
    last = last_done = time.monotonic()
    pool = _FetchThreads(threads, limiter)
    try:
        with Fetcher(settings.download, limiter=pool.limiter) as fetcher:
            todo = iter(job.indexed_rows())
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
                timeout = PROGRESS_EVERY_S  # a finished row, the next progress tick...
                if stuck_s is not None and submitted == len(job.rows) and len(pending) <= allowance:
                    timeout = min(timeout, max(0.0, stuck_s - (time.monotonic() - last_done)))  # ...or the cutoff
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
                    _check_driver(fence, job.shard)  # an orphaned task stops working, not only committing
                    if rows_since:
                        yield ShardProgress(job.shard, rows_since, ok_since)
                        rows_since = ok_since = 0
                    last = now
            pool.stop()
        _check_driver(fence, job.shard)
        summary = writer.commit()
    except BaseException:
        pool.stop()
        writer.discard()
        raise
    yield summary


def build_shard(job: ShardJob, settings: SampleSettings, output_path: str, digits: int,
                extra_cols: list[str], storage_options: dict[str, Any] | None = None,
                limiter: Limiter | None = None, fence: DriverFence | None = None) -> dict[str, Any]:
    """Run one shard to completion in this process and return its summary."""
    result: dict[str, Any] = {}
    for event in iter_build_shard(job, settings, output_path, digits, extra_cols, storage_options, limiter, fence):
        if isinstance(event, dict):
            result = event
    return result
