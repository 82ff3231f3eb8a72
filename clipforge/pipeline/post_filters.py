"""Filters that need every shard finished: exact and near de-duplication, CLIP score.

Each one decides on the driver-side `ManifestView` (exact, then near, then score: a row dropped by
one is not looked at by the next), then every affected shard is rewritten once (`rewrite.py`).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clipforge.pipeline import status as st
from clipforge.pipeline.dedup import find_duplicates, find_near_duplicates
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.manifest_view import ManifestView
from clipforge.pipeline.rewrite import rewrite_shard
from clipforge.pipeline.spec import FilterSpec

log = logging.getLogger(__name__)
_REWRITE_THREADS = 4


def wanted(filters: FilterSpec) -> bool:
    return filters.dedup_exact or filters.near_dup_max_distance is not None or filters.clip_score is not None


def _shards_of(view: ManifestView, rows: dict[int, str]) -> int:
    return len({view.shard[view.position[r]] for r in rows})


def run_post_filters(layout: OutputLayout, shards: list[int], filters: FilterSpec, image_ext: str,
                     env: dict[str, str]) -> dict[str, Any]:
    """Apply the enabled filters to the given shards; returns per-filter counts for stats.json.

    The CLIP-score filter runs on Ray: call this inside the build's Ray session.
    """
    report: dict[str, Any] = {"dedup": None, "near_dedup": None, "clip_score": None}
    if not wanted(filters):
        return report
    view = ManifestView.read(layout, shards)
    if filters.dedup_exact:
        found = find_duplicates(view)
        for row, message in found.items():
            view.drop(row, st.DUPLICATE, message)
        report["dedup"] = {"duplicates_marked": len(found), "shards_rewritten": _shards_of(view, found)}
    if filters.near_dup_max_distance is not None:
        found = find_near_duplicates(view, filters.near_dup_max_distance)
        for row, message in found.items():
            view.drop(row, st.NEAR_DUPLICATE, message)
        report["near_dedup"] = {"near_duplicates_marked": len(found), "shards_rewritten": _shards_of(view, found),
                                "max_distance": filters.near_dup_max_distance}
    if filters.clip_score is not None:
        from clipforge.pipeline.clip_score import apply_clip_score

        report["clip_score"] = apply_clip_score(view, layout, filters.clip_score, image_ext, env)
    todo = view.shards_to_rewrite()
    with ThreadPoolExecutor(_REWRITE_THREADS) as pool:  # I/O bound, and object stores are far away
        list(pool.map(lambda s: rewrite_shard(layout, s, view.drops.get(s, {}), view.new_scores.get(s)), todo))
    if todo:
        log.info("post-download filters rewrote %d shard(s)", len(todo))
    return report
