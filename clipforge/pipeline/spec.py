"""Typed spec of a dataset build (`kind: build`): URL list in, WebDataset shards + manifest out."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from clipforge.models.spec import ModelSpec
from clipforge.specbase import OutputFolder, RayInit, Scaling, Spec

# Fields of each sample's .json and of the per-shard parquet that the builder fills in.
RESERVED_SAMPLE_FIELDS = frozenset({
    "url", "caption", "key", "row", "status", "error_message", "width", "height",
    "original_width", "original_height", "sha256", "content_sha256",
})


class InputSpec(Spec):
    path: str = Field(..., description="URL list: a file, a folder or a glob; local or any fsspec path (s3://...).")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = Field(
        "auto", description="File format; `auto` picks it from the extension (.gz allowed for text formats)."
    )
    url_col: str = Field("url", description="Column holding the image URL.")
    caption_col: str | None = Field("caption", description="Column holding the caption (None: no captions).")
    extra_cols: list[str] = Field(default_factory=list, description="Columns copied into each sample's .json.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for input.path, e.g. {endpoint_url: ..., key: ..., secret: ...} for s3://.",
    )

    @field_validator("extra_cols")
    @classmethod
    def _extra_cols_distinct(cls, cols: list[str]) -> list[str]:
        # Extra columns sit beside the fields the builder writes itself; a clash would overwrite one of them.
        clash = sorted(set(cols) & RESERVED_SAMPLE_FIELDS)
        if clash:
            raise ValueError(f"{clash} are written by the builder itself; rename these columns")
        if len(set(cols)) != len(cols):
            raise ValueError("a column is listed twice")
        return cols


class OutputSpec(Spec):
    path: OutputFolder = Field(..., description="Output folder for shards, manifest/ and stats.json (local or fsspec).")
    overwrite: bool = Field(
        False, description="Write into output.path even if it holds files of something else (another job, or not "
        "clipforge at all): files of the same names are replaced, others are left alone. Without it the folder must "
        "be empty, missing, or this build's own earlier output (which the build then resumes).",
    )
    samples_per_shard: int = Field(1000, ge=1, le=1_000_000, description="Rows of the input per output shard.")
    image_format: Literal["jpg", "png", "webp"] = Field("jpg", description="Encoding of the stored images.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for output.path (also used by every shard task), e.g. an S3 endpoint_url.",
    )


class StragglerSpec(Spec):
    """When a shard may finish without its last few slow rows (they would otherwise hold up the build)."""

    max_remaining_fraction: float = Field(
        0.01, gt=0, le=1,
        description="A shard may give up on at most this fraction of its rows (rounded down, at least 1 row).",
    )
    stuck_seconds: float = Field(
        30.0, gt=0, description="...and only once no row of the shard has finished for this many seconds.",
    )


def _network_text(text: str) -> str:
    from clipforge.pipeline.netguard import parse_network  # ipaddress only; kept out of spec import time

    return str(parse_network(text))


# One `download.allow_networks` entry: checked on its own so that an error names it (`allow_networks.0`), stored
# normalised (192.168.1.5 -> 192.168.1.5/32).
NetworkText = Annotated[str, AfterValidator(_network_text)]


class DownloadSpec(Spec):
    threads_per_worker: int = Field(16, ge=1, le=1024, description="Concurrent downloads in each worker process.")
    timeout_s: float = Field(
        10.0, gt=0,
        description="Seconds allowed for connecting and for each read. A whole attempt (redirects, headers and "
        "body) must end within 4x this, however slowly the server sends; past that it fails as `timeout`.",
    )
    retries: int = Field(
        1, ge=0, le=100, description="Retries for transient failures (timeouts, 5xx, connection errors)."
    )
    retry_backoff_s: float = Field(
        0.5,
        ge=0,
        description="First retry waits this long, each further one twice as long (a Retry-After up to 30 s wins).",
    )
    max_bytes: int = Field(20_000_000, ge=1, le=1 << 31,
                           description="Larger responses are refused as `too_large` (at most 2 GiB: bodies are held in "
                           "memory).")
    max_pixels: int = Field(89_478_485, ge=1, le=1 << 31,
                            description="Images with more pixels are refused without decoding.")
    allow_private_networks: bool = Field(
        False,
        description="Allow loopback and private ranges (127.0.0.0/8, ::1, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, "
        "fc00::/7). Never opens link-local or cloud metadata addresses (169.254.169.254 ...): see allow_networks. "
        "Off by default: never fetch internal hosts.",
    )
    allow_networks: list[NetworkText] = Field(
        default_factory=list,
        description="Non-public networks a build may fetch from, as CIDR ranges or addresses (10.20.0.0/16, "
        "192.168.1.5). Link-local and cloud metadata addresses are reachable only through an entry that contains "
        "them and is no wider than /16 (IPv4) or /10 (IPv6), e.g. 169.254.0.0/16.",
    )
    user_agent: str = Field("clipforge/0.1 (+https://github.com/clipforge)", description="HTTP User-Agent.")
    straggler: StragglerSpec | None = Field(
        None, description="Cut off a shard's last stuck rows as `skipped_straggler` (None: wait for every row).",
    )
    per_domain_rps: float | None = Field(
        None, gt=0, description="Most requests per second to any one host, across all workers (None: no limit).",
    )
    per_domain_burst: int = Field(
        1, ge=1, description="Requests a host may get back to back before per_domain_rps spacing applies.",
    )


class ResizeSpec(Spec):
    size: int = Field(256, ge=1, le=16384, description="Target side length in pixels (at most 16384).")
    mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        "border", description="img2dataset's resize modes."
    )


class ClipScoreSpec(Spec):
    """Image-text similarity filter run on the finished shards with a pool of model actors."""

    model: ModelSpec = Field(..., description="The scoring model (a clipforge/open_clip config and weights).")
    threshold: float | None = Field(
        None, ge=-1, le=1, description="Keep pairs whose cosine similarity is at least this.",
    )
    top_fraction: float | None = Field(
        None, gt=0, le=1, description="Keep this fraction of the scored pairs, highest scores first.",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Pairs per model call.")
    workers: int = Field(2, ge=1, le=10_000, description="Scoring actors.")
    cpus_per_worker: float = Field(
        0.5, gt=0, le=1024, description="CPUs each actor reserves (fractional on small machines)."
    )

    @model_validator(mode="after")
    def _one_rule_at_least(self) -> "ClipScoreSpec":
        if self.threshold is None and self.top_fraction is None:
            raise ValueError("set clip_score.threshold, clip_score.top_fraction or both")
        return self


class FilterSpec(Spec):
    min_image_size: int = Field(0, ge=0, le=16384, description="Drop images whose shorter side is below this (pixels).")
    max_aspect_ratio: float | None = Field(None, gt=0, description="Drop images with long/short side above this.")
    min_caption_chars: int = Field(0, ge=0, description="Drop rows whose caption is shorter.")
    max_caption_chars: int | None = Field(None, ge=1, description="Drop rows whose caption is longer.")
    dedup_exact: bool = Field(False, description="Drop exact duplicate images (same content hash), keep the first.")
    near_dup_max_distance: int | None = Field(
        None, ge=0, le=16,
        description="Drop images whose 64-bit perceptual hash is within this Hamming distance of an earlier "
        "kept image's, as `near_duplicate` (None: off).",
    )
    clip_score: ClipScoreSpec | None = Field(
        None, description="Drop image-caption pairs a CLIP model scores low, as `filtered_clip_score` (None: off).",
    )


class BuildSpec(Spec):
    """`kind: build` — download, resize, filter and shard a URL list."""

    kind: Literal["build"]
    name: str = Field("build", description="Job name.")
    input: InputSpec
    output: OutputSpec
    download: DownloadSpec = Field(default_factory=DownloadSpec)
    resize: ResizeSpec = Field(default_factory=ResizeSpec)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    scaling: Scaling = Field(default_factory=lambda: Scaling(workers=2, cpus_per_worker=0.5))
    ray: RayInit = Field(default_factory=RayInit)
    incremental: Literal["skip", "retry_failed", "overwrite"] = Field(
        "skip",
        description="What a re-run does with the shards an earlier run of this build finished: `skip` leaves them "
        "as they are (a re-run only builds the missing ones); `retry_failed` downloads again the rows that failed "
        "for a reason that may pass (timeout, connection_error, http_5xx, http_429, skipped_straggler) and rewrites "
        "only the shards holding them; `overwrite` rebuilds every shard. Shards are replaced one at a time, "
        "atomically; other files in output.path are left alone.",
    )
    min_success_fraction: float | None = Field(
        None, ge=0, le=1,
        description="The build fails (exit code 1, every output kept) when fewer than this fraction of the input "
        "rows end `ok`. None: at least one row must; 0: never fail for failed rows.",
    )

    @model_validator(mode="after")
    def _caption_bounds(self) -> "BuildSpec":
        f = self.filters
        if f.max_caption_chars is not None and f.max_caption_chars < f.min_caption_chars:
            raise ValueError("filters.max_caption_chars must be >= filters.min_caption_chars")
        return self
