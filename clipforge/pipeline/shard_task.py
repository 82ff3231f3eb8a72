"""One shard of a build: download and process its rows on a thread pool, then commit its files.

`iter_build_shard` is the body of one Ray generator task: it yields small progress events while it
works (so the driver's progress bar moves within a shard) and the shard summary last. It has no Ray
dependency itself; `build_shard` runs it in-process.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterator

from clipforge.pipeline.fetch import Fetcher
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.sample import InputRow, SampleSettings, process_row
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


def iter_build_shard(job: ShardJob, settings: SampleSettings, output_path: str, digits: int,
                     extra_cols: list[str]) -> Iterator[ShardProgress | dict[str, Any]]:
    """Process every row and commit the shard; yields ShardProgress events, then the summary dict."""
    layout = OutputLayout(output_path)
    writer = ShardWriter(layout, job.shard, settings.output.image_format, digits, extra_cols)
    threads = max(1, min(settings.download.threads_per_worker, len(job.rows)))
    # At most two rows per thread are in flight or finished-but-unwritten: bounds memory for big images.
    window = 2 * threads
    rows_since = ok_since = 0
    last = time.monotonic()
    try:
        with Fetcher(settings.download) as fetcher, ThreadPoolExecutor(threads, "fetch") as pool:
            todo = iter(enumerate(job.rows))
            pending: set = set()
            while True:
                for index, row in todo:
                    pending.add(pool.submit(process_row, row, index, fetcher, settings))
                    if len(pending) >= window:
                        break
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    outcome = fut.result()
                    writer.add(outcome)
                    rows_since += 1
                    ok_since += outcome.ok
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    yield ShardProgress(job.shard, rows_since, ok_since)
                    rows_since = ok_since = 0
                    last = time.monotonic()
        summary = writer.commit()
    except BaseException:
        writer.discard()
        raise
    yield summary


def build_shard(job: ShardJob, settings: SampleSettings, output_path: str, digits: int,
                extra_cols: list[str]) -> dict[str, Any]:
    """Run one shard to completion in this process and return its summary."""
    result: dict[str, Any] = {}
    for event in iter_build_shard(job, settings, output_path, digits, extra_cols):
        if isinstance(event, dict):
            result = event
    return result
