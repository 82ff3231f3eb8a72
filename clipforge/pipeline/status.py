"""Per-row outcome codes of a build and how they map onto img2dataset's coarser statuses.

The manifest stores the fine code (`ok`, `http_404`, `too_large`, ...); the per-shard parquet keeps
img2dataset's vocabulary so that tools written for img2dataset output can read it unchanged.
"""
from __future__ import annotations

OK = "ok"
EMPTY_URL = "empty_url"
INVALID_URL = "invalid_url"
PRIVATE_ADDRESS = "private_address"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TOO_MANY_REDIRECTS = "too_many_redirects"
OPTED_OUT = "opted_out"
TOO_LARGE = "too_large"
NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
FILTERED_CLIP_SCORE = "filtered_clip_score"
# Given up on by the straggler cutoff: the shard finished without waiting for this row's answer.
SKIPPED_STRAGGLER = "skipped_straggler"


def http_status(code: int) -> str:
    return f"http_{code}"


# Codes decided after the bytes arrived: img2dataset reports these as failed resizes.
_AFTER_DOWNLOAD = {NOT_AN_IMAGE, TOO_MANY_PIXELS, TOO_SMALL, BAD_ASPECT_RATIO}
# Rows dropped by a choice of the build rather than a failure.
_FILTERED = {CAPTION_TOO_SHORT, CAPTION_TOO_LONG, DUPLICATE, NEAR_DUPLICATE, FILTERED_CLIP_SCORE}


# Failures that may not happen again: no answer in time, no connection, the server busy or broken (5xx, 429), or
# the straggler cutoff. `incremental: retry_failed` downloads these rows again; the rest (404, not an image,
# filtered, duplicate, ...) would end the same way. Kept in step with the fetcher's own retries (`fetch.py`).
_TRANSIENT = {TIMEOUT, CONNECTION_ERROR, SKIPPED_STRAGGLER, http_status(429)}


def is_transient(code: str) -> bool:
    """Whether a row with this code may succeed if downloaded again."""
    if code in _TRANSIENT:
        return True
    return code.startswith("http_5") and len(code) == len("http_500") and code[len("http_"):].isdigit()


def img2dataset_status(code: str) -> str:
    """`ok` -> success; decode/image filters -> failed_to_resize; caption, dedup and score filters -> filtered;
    anything else (straggler cutoff included) -> failed_to_download."""
    if code == OK:
        return "success"
    if code in _AFTER_DOWNLOAD:
        return "failed_to_resize"
    if code in _FILTERED:
        return "filtered"
    return "failed_to_download"
