"""The build-level stats.json (aggregated from the manifests) and its summary table."""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clipforge.pipeline import status as st
from clipforge.pipeline.layout import OutputLayout

_READ_THREADS = 8


def status_counts_by_shard(layout: OutputLayout, shards: list[int]) -> dict[int, collections.Counter]:
    """Per-shard status counts, read from the manifests (the source of truth, also for resumed shards)."""
    def read(shard: int) -> collections.Counter:
        return collections.Counter(layout.read_table(layout.manifest(shard), ["status"]).column(0).to_pylist())

    with ThreadPoolExecutor(_READ_THREADS) as pool:
        return dict(zip(shards, pool.map(read, shards)))


def build_stats(counts: dict[int, collections.Counter], written: set[int], wall_s: float,
                extra: dict[str, Any]) -> dict[str, Any]:
    total: collections.Counter[str] = collections.Counter()
    this_run: collections.Counter[str] = collections.Counter()
    for shard, c in counts.items():
        total.update(c)
        if shard in written:
            this_run.update(c)
    rows = sum(total.values())
    ok = total[st.OK]
    run_rows = sum(this_run.values())
    return {
        "total": rows,
        "ok": ok,
        "failed": rows - ok,
        "status_counts": dict(total.most_common()),
        "shards": len(counts),
        "shards_written": len(written),
        "shards_skipped": len(counts) - len(written),
        "rows_this_run": run_rows,
        "ok_this_run": this_run[st.OK],
        "wall_seconds": round(wall_s, 3),
        "images_per_second": round(this_run[st.OK] / wall_s, 2) if wall_s > 0 else 0.0,
        "rows_per_second": round(run_rows / wall_s, 2) if wall_s > 0 else 0.0,
        **extra,
    }


def summary_table(stats: dict[str, Any]) -> str:
    total = stats["total"] or 1
    lines = [f"{'status':<22}{'rows':>10}{'share':>9}", "-" * 41]
    for code, n in stats["status_counts"].items():
        lines.append(f"{code:<22}{n:>10}{100 * n / total:>8.1f}%")
    lines.append("-" * 41)
    lines.append(f"{'total':<22}{stats['total']:>10}")
    lines.append(
        f"shards: {stats['shards_written']} written, {stats['shards_skipped']} already done; "
        f"{stats['wall_seconds']:.1f} s, {stats['images_per_second']:.1f} images/s"
    )
    return "\n".join(lines)
