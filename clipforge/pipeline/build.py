"""`kind: build`: a URL list -> WebDataset shards, per-shard parquet/stats, manifest and stats.json.

The driver streams the input, cuts it into shards of consecutive rows and runs each shard as one
Ray task (at most 2 x scaling.workers in flight, so a huge input never sits in memory). Shards that
are already complete (tar + manifest present) are skipped (`incremental: skip`, the default): re-running
a finished build does nothing and re-running a crashed one finishes the rest. `incremental: retry_failed`
also downloads again the rows of complete shards that failed for a reason that may pass, patching only
those shards (`incremental.py`, `shard_patch.py`); `overwrite` rebuilds every shard. Filters that need
every shard (exact and near de-duplication, CLIP score) run after all shards are done, over the whole
output (see `post_filters.py`). Then sizes.json and stats.json are written, and a build in which too few
rows ended `ok` (`min_success_fraction`) fails with its outputs kept.

Remote outputs: `output.storage_options` travel with each task; AWS_* settings of the driver's
environment are handed to the tasks as runtime_env variables (see `clipforge.runtime.remote_env`). With
`download.per_domain_rps`, one small actor holds the build's per-host token buckets.

Lifecycle: a build ends with nothing of its own running. A private local Ray (no address given) is
reaped when the driver ends, however it ends (`clipforge.runtime.ray_session`); shard tasks commit only
while the driver lives (`driver_fence.py`), and a run first removes the temporary files an earlier,
killed run left.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Iterator, cast

from tqdm import tqdm

from clipforge.pipeline import status as st
from clipforge.pipeline.build_stats import build_stats, status_counts_by_shard, summary_table
from clipforge.pipeline.driver_fence import DriverFence, cluster_has_other_hosts, start_lifeline_actor
from clipforge.pipeline.errors import BuildOutputError, TooFewSuccessesError
from clipforge.pipeline.incremental import rows_to_retry
from clipforge.pipeline.inputs import UrlList
from clipforge.pipeline.layout import SIZES_FILE, OutputLayout, key_digits
from clipforge.pipeline.post_filters import run_post_filters, wanted
from clipforge.pipeline.sample import SampleSettings
from clipforge.pipeline.shard_task import ShardJob, ShardProgress, iter_build_shard
from clipforge.pipeline.spec import BuildSpec
from clipforge.runtime.output_folder import OutputOwner, claim_output_folder
from clipforge.runtime.ray_session import ray_session
from clipforge.runtime.remote_env import forwarded_env
from clipforge.runtime.run_dir import BUILD_STATS_FILE
from clipforge.runtime.storage_errors import storage_errors

if TYPE_CHECKING:
    from ray import ObjectRefGenerator

log = logging.getLogger(__name__)


class _Progress:
    """Driver-side progress bar: rows done, ok, failed, images/s of this run while shards download; the
    build's final counts (after the post-download filters, resumed shards included) at the end."""

    def __init__(self, total: int | None, name: str, enabled: bool):
        self.bar = tqdm(total=total, unit="row", desc=name, disable=not enabled, dynamic_ncols=True)
        self.name = name
        self.t0 = time.time()
        self.ok = 0
        self.failed = 0
        self.skipped = 0

    def add(self, rows: int, ok: int) -> None:
        self.ok += ok
        self.failed += rows - ok
        self.bar.update(rows)
        rate = self.ok / max(time.time() - self.t0, 1e-6)
        self.bar.set_postfix(ok=self.ok, failed=self.failed, img_s=f"{rate:.1f}", refresh=False)

    def skip(self, rows: int) -> None:
        self.skipped += rows
        self.bar.update(rows)

    def filtering(self) -> None:
        """The downloads are done; the counts shown stay those of before the filters until `finish`."""
        self.bar.set_description(f"{self.name} (post-download filters)")

    def finish(self, stats: dict[str, Any]) -> None:
        """Show the counts of the finished build, as stats.json has them."""
        self.bar.set_description(self.name, refresh=False)
        self.bar.set_postfix(ok=stats["ok"], failed=stats["failed"], img_s=f"{stats['images_per_second']:.1f}",
                             refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _Scheduler:
    """Keeps at most `limit` shard tasks in flight and feeds their progress events to the bar."""

    def __init__(self, task, limit: int, progress: _Progress):
        self.task = task
        self.limit = limit
        self.progress = progress
        self.inflight: dict[Any, ShardJob] = {}
        self.reported: dict[int, tuple[int, int]] = {}
        self.written: set[int] = set()
        self.summaries: dict[int, dict[str, Any]] = {}

    def submit(self, job: ShardJob, *args) -> None:
        while len(self.inflight) >= self.limit:
            self.poll()
        self.inflight[self.task.remote(job, *args)] = job
        self.reported[job.shard] = (0, 0)

    def drain(self) -> None:
        while self.inflight:
            self.poll()

    def cancel(self) -> None:
        import ray

        for gen in self.inflight:
            try:
                ray.cancel(gen)
            except Exception:  # noqa: BLE001 - best effort while already failing
                pass
        self.inflight.clear()

    def poll(self) -> None:
        import ray

        ready, _ = ray.wait(list(self.inflight), num_returns=1)
        # ray.wait hands back some of the waitables it was given: here, the shard tasks' generators.
        for gen in cast("list[ObjectRefGenerator]", ready):
            job = self.inflight[gen]
            try:
                event = ray.get(next(gen))
            except StopIteration:
                del self.inflight[gen]
                if job.shard not in self.written:
                    raise BuildOutputError(f"shard {job.shard}: task ended without a summary") from None
                continue
            except Exception as e:
                raise BuildOutputError(
                    f"shard {job.shard} (rows {job.rows[0].row}-{job.rows[-1].row}) failed: {e}"
                ) from e
            rows, ok = self.reported[job.shard]
            if isinstance(event, ShardProgress):
                self.reported[job.shard] = (rows + event.rows, ok + event.ok)
                self.progress.add(event.rows, event.ok)
            else:
                self.written.add(job.shard)
                self.summaries[job.shard] = event
                counts = event["status_counts"]
                self.progress.add(event["rows"] - rows, counts.get("ok", 0) - ok)


def _task_options(spec: BuildSpec, env: dict[str, str]) -> dict[str, Any]:
    scaling = spec.scaling
    options: dict[str, Any] = {"num_cpus": scaling.cpus_per_worker, "num_returns": "streaming"}
    if scaling.gpus_per_worker:
        options["num_gpus"] = scaling.gpus_per_worker
    if scaling.resources:
        options["resources"] = dict(scaling.resources)
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


# What a build writes at the top of its output folder (hidden names: temporary files of unfinished writes).
OUTPUT_ENTRIES = ("[0-9]*.tar", "[0-9]*.parquet", "[0-9]*_stats.json", "manifest", SIZES_FILE, BUILD_STATS_FILE,
                  ".*.tmp-*")
# Failure reasons named in the message of a build with too few successes (the manifest command lists them all).
_REASONS_SHOWN = 3


def _open_output(spec: BuildSpec) -> tuple[OutputLayout, set[int]]:
    """The output layout and the complete shards this run keeps (none unless the folder holds this build's own
    earlier output: a folder taken with `output.overwrite` is built afresh; none with `incremental: overwrite`)."""
    owner = OutputOwner("build", spec.name, "output.path", own_names=OUTPUT_ENTRIES, signature=("manifest",))
    resumed = claim_output_folder(spec.output.path, owner, spec.output.overwrite, spec.output.storage_options)
    try:
        layout = OutputLayout(spec.output.path, spec.output.storage_options)
        with storage_errors("output.path", spec.output.path):
            layout.make_dirs()
            keep = resumed and spec.incremental != "overwrite"
            return layout, layout.completed_shards() if keep else set()
    except (TypeError, ValueError, ImportError) as e:
        raise BuildOutputError(f"output.path `{spec.output.path}`: cannot create or list it: {e}") from None


def _patch_job(job: ShardJob, rows: set[int]) -> ShardJob:
    """The part of a complete shard's job that is downloaded again: `rows`, at their places in the shard."""
    picked = [(pos, row) for pos, row in job.indexed_rows() if row.row in rows]
    return ShardJob(job.shard, [row for _, row in picked], positions=[pos for pos, _ in picked])


@contextlib.contextmanager
def _driver_fence() -> Iterator[DriverFence]:
    """The fence shard tasks check before committing; with nodes on other hosts, backed by an actor."""
    import ray

    lifeline = start_lifeline_actor() if cluster_has_other_hosts() else None
    try:
        yield DriverFence.for_this_process(lifeline)
    finally:
        if lifeline is not None:
            ray.kill(lifeline)  # the build is over: a task still running must not commit any more


def _run_shards(spec: BuildSpec, urls: UrlList, layout: OutputLayout, done: set[int], redo: dict[int, set[int]],
                settings: SampleSettings, env: dict[str, str], bar: _Progress) -> tuple[list[int], _Scheduler]:
    """Run every shard not done yet, and the rows `redo` ({shard: rows}) of done ones, as Ray tasks (Ray must be
    up); returns all shards and the scheduler (which shards it wrote, their summaries)."""
    import ray

    limiter = limiter_actor = None
    if spec.download.per_domain_rps:
        from clipforge.pipeline.ratelimit import start_shared_limiter

        limiter, limiter_actor = start_shared_limiter(spec.download.per_domain_rps, spec.download.per_domain_burst)
    task = ray.remote(iter_build_shard).options(**_task_options(spec, env))
    sched = _Scheduler(task, limit=2 * spec.scaling.workers, progress=bar)
    shards: list[int] = []
    try:
        with _driver_fence() as fence:
            args = (ray.put(settings), layout.portable_url, key_digits(spec.output.samples_per_shard),
                    list(spec.input.extra_cols), layout.storage_options, limiter, fence)
            try:
                for job in urls.iter_shards(spec.output.samples_per_shard):
                    shards.append(job.shard)
                    if job.shard in done:
                        if not redo.get(job.shard):
                            bar.skip(len(job.rows))
                            continue
                        patch = _patch_job(job, redo[job.shard])
                        bar.skip(len(job.rows) - len(patch.rows))
                        job = patch
                    sched.submit(job, *args)
                sched.drain()
            except BaseException:
                sched.cancel()  # while Ray is still up: a shared cluster must not keep working for nothing
                raise
    finally:
        if limiter_actor is not None:
            ray.kill(limiter_actor)
    return shards, sched


def _retried(redo: dict[int, set[int]], sched: _Scheduler) -> dict[str, int]:
    """stats.json's account of the rows downloaded again this run (`incremental: retry_failed`)."""
    patched = [sched.summaries[s] for s in redo if s in sched.summaries]
    return {"shards": len(patched), "rows": sum(p["rows"] for p in patched),
            "ok": sum(p["status_counts"].get("ok", 0) for p in patched)}


def _require_successes(spec: BuildSpec, stats: dict[str, Any]) -> None:
    """Raise TooFewSuccessesError when fewer rows ended `ok` than `min_success_fraction` asks (unset: when none did)."""
    total, ok = stats["total"], stats["ok"]
    fraction = ok / total if total else 0.0
    wanted = spec.min_success_fraction
    if wanted == 0 or (ok > 0 and fraction >= (wanted or 0.0)):
        return
    rule = ("min_success_fraction is not set, so at least one row must succeed" if wanted is None
            else f"below min_success_fraction {wanted}")
    failures = [(code, n) for code, n in stats["status_counts"].items() if code != "ok"]
    shown = ", ".join(f"{code} {n}" for code, n in failures[:_REASONS_SHOWN])
    hidden = len(failures) - _REASONS_SHOWN
    more = f" and {hidden} more reason{'s' if hidden > 1 else ''}" if hidden > 0 else ""
    out = spec.output.path.rstrip("/")
    raise TooFewSuccessesError(
        f"build `{spec.name}`: ok fraction {fraction:.4f} ({ok} of {total} rows) - {rule}; "
        f"failed rows: {shown or 'none'}{more}; every output is kept, manifest in {out}/manifest/: list the failed "
        f"rows with `clipforge manifest failures {out}`")


def run_build(spec: BuildSpec, progress: bool = True) -> dict:
    """Build the dataset described by `spec`; returns the stats also written to stats.json."""
    t0 = time.time()
    with storage_errors("input.path", spec.input.path):
        urls = UrlList(spec.input)  # fails fast on missing files/columns, before any Ray start-up
    layout, done = _open_output(spec)
    with storage_errors("output.path", spec.output.path):
        layout.remove_all_stale_temps()  # left by an earlier run killed in any phase; this one wrote nothing yet
        redo = rows_to_retry(layout, done, spec.filters) if spec.incremental == "retry_failed" else {}
    env = forwarded_env(layout.is_local)
    settings = SampleSettings(spec.download, spec.resize, spec.filters, spec.output)
    bar = _Progress(urls.count_rows(), spec.name, progress)
    try:
        with ray_session(spec.ray):
            shards, sched = _run_shards(spec, urls, layout, done, redo, settings, env, bar)
            if wanted(spec.filters):
                bar.filtering()
            filtered = run_post_filters(layout, shards, spec.filters, spec.output.image_format, env)
        counts = status_counts_by_shard(layout, shards)
        extra = {"name": spec.name, "output": spec.output.path, **filtered,
                 "malformed_input_lines": urls.malformed_lines, "incremental": spec.incremental,
                 "retried": _retried(redo, sched) if spec.incremental == "retry_failed" else None}
        stats = build_stats(counts, sched.written, time.time() - t0, extra)
        # The manifests' `ok` rows are exactly the samples in the tars (every writer keeps them in step).
        layout.write_sizes({shard: c[st.OK] for shard, c in counts.items()})
        layout.write_json(layout.stats, stats)  # last: its presence says the build finished
        bar.finish(stats)
    finally:
        bar.close()
    log.info("build %s -> %s\n%s", spec.name, spec.output.path, summary_table(stats))
    _require_successes(spec, stats)
    return stats
