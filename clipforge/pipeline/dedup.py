"""De-duplication across shards, decided on the manifests once all shards are done.

Shards are built in parallel, so "first" can only be decided at the end. Both passes walk rows in
input order and keep the first of each group; they only decide (`{row: message}`), the shards are
rewritten by `post_filters`.
- exact: identical downloaded bytes (content hash); ~100 bytes of driver memory per `ok` row.
- near: stored images whose perceptual hashes are within `max_distance` bits of an earlier *kept*
  image (see `phash.py`); a row is compared with kept rows only, so dropping never cascades.
Re-running either is harmless: rows already dropped are no longer `ok` and are not looked at.
"""
from __future__ import annotations

from clipforge.pipeline import status as st
from clipforge.pipeline.manifest_view import ManifestView
from clipforge.pipeline.phash import NearDuplicateIndex, from_hex


def find_duplicates(view: ManifestView) -> dict[int, str]:
    """{row: message} for every `ok` row whose content hash an earlier `ok` row has."""
    first_of: dict[str, int] = {}
    found: dict[int, str] = {}
    for i in view.indices_with_status(st.OK):
        digest = view.content_sha256[i]
        if digest is None:
            continue
        row = view.row[i]
        first = first_of.setdefault(digest, row)
        if first != row:
            found[row] = f"same image as row {first}"
    return found


def find_near_duplicates(view: ManifestView, max_distance: int) -> dict[int, str]:
    """{row: message} for every `ok` row whose stored image looks like an earlier kept `ok` row's."""
    index = NearDuplicateIndex(max_distance)
    found: dict[int, str] = {}
    for i in view.indices_with_status(st.OK):
        text = view.phash[i]
        if text is None:
            continue
        value, row = from_hex(text), view.row[i]
        hit = index.find(value)
        if hit is None:
            index.add(value, row)
        else:
            found[row] = f"looks like row {hit[0]} (perceptual hash distance {hit[1]})"
    return found
