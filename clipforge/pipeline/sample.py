"""One input row -> one outcome: checks that need no network first, then download and image processing."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from clipforge.pipeline import status as st
from clipforge.pipeline.fetch import Fetcher, FetchFailed
from clipforge.pipeline.imaging import EncodedImage, ImageRejected, process_image
from clipforge.pipeline.spec import DownloadSpec, FilterSpec, OutputSpec, ResizeSpec
from clipforge.pipeline.urls import InvalidURL, parse_target


@dataclass
class InputRow:
    """A row of the URL list as read: its global index, URL, caption and extra columns.

    `problem` is set when the reader could not parse the row at all; such rows fail as `invalid_url`.
    """

    row: int
    url: Any
    caption: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class RowOutcome:
    row: InputRow
    index: int  # position in the shard, which the sample key is built from
    status: str
    error: str | None = None
    image: EncodedImage | None = None
    content_sha256: str | None = None  # hash of the downloaded bytes: the exact-dedup identity

    @property
    def ok(self) -> bool:
        return self.status == st.OK


@dataclass(frozen=True)
class SampleSettings:
    """The parts of a BuildSpec that a worker needs to turn rows into samples."""

    download: DownloadSpec
    resize: ResizeSpec
    filters: FilterSpec
    output: OutputSpec


def caption_text(value: Any) -> str:
    return "" if value is None else str(value)


def _precheck(row: InputRow, filters: FilterSpec) -> tuple[str, str] | None:
    """Reasons to drop a row without downloading it (bad URL, caption out of bounds)."""
    if row.problem:
        return st.INVALID_URL, row.problem
    if row.url is None or not str(row.url).strip():
        return st.EMPTY_URL, "URL is empty"
    try:
        parse_target(str(row.url))
    except InvalidURL as e:
        return st.INVALID_URL, str(e)
    n = len(caption_text(row.caption).strip())
    if n < filters.min_caption_chars:
        return st.CAPTION_TOO_SHORT, f"caption has {n} characters, min_caption_chars is {filters.min_caption_chars}"
    if filters.max_caption_chars is not None and n > filters.max_caption_chars:
        return st.CAPTION_TOO_LONG, f"caption has {n} characters, max_caption_chars is {filters.max_caption_chars}"
    return None


def process_row(row: InputRow, index: int, fetcher: Fetcher, settings: SampleSettings) -> RowOutcome:
    """Everything that can happen to one row; never raises for a problem of the row itself."""
    rejected = _precheck(row, settings.filters)
    if rejected:
        return RowOutcome(row, index, *rejected)
    try:
        data = fetcher.fetch(str(row.url).strip())
    except FetchFailed as e:
        return RowOutcome(row, index, e.code, str(e))
    digest = hashlib.sha256(data).hexdigest()
    out = settings.output
    try:
        image = process_image(
            data, settings.resize, settings.filters, settings.download.max_pixels, out.image_format, out.quality
        )
    except ImageRejected as e:
        return RowOutcome(row, index, e.code, str(e), content_sha256=digest)
    except Exception as e:  # noqa: BLE001 - an image codec bug on one odd file must not fail the shard
        return RowOutcome(row, index, st.NOT_AN_IMAGE, f"{type(e).__name__}: {e}", content_sha256=digest)
    return RowOutcome(row, index, st.OK, image=image, content_sha256=digest)
