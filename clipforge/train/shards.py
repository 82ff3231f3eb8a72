"""Finding WebDataset shards and reading their training samples, without decoding anything.

Shards are tar files whose consecutive members are grouped into samples by key (see
clipforge.runtime.tar_shard_reader, which reads them). Paths may be local or any fsspec URL; folders and
globs are expanded to the `*.tar` files they hold. Damaged shards and incomplete samples are skipped and
counted, never fatal: counting and reading skip exactly the same ones, so counts plan exact resumes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from clipforge.errors import UserError
from clipforge.runtime.storage_errors import storage_errors
from clipforge.runtime.tar_shard_reader import Handler, ShardReadError, count_shard_samples, iter_shard_samples

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


class ShardError(UserError, ValueError):
    """A shard list entry that names nothing readable."""


def expand_shards(patterns: list[str], where: str = "data.shards") -> list[str]:
    """Files, folders (their `*.tar`) and globs -> sorted, de-duplicated shard URLs.

    The result keeps each entry's protocol so that the URLs can be opened on any worker; `where`
    names the spec field in error messages.
    """
    urls: list[str] = []
    for pattern in patterns:
        with storage_errors(where, pattern):
            urls.extend(_expand_one(pattern, where))
    return list(dict.fromkeys(urls))  # duplicates dropped, first occurrence's order kept


def _expand_one(pattern: str, where: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(pattern)
    if any(c in path for c in _GLOB_CHARS):
        found = [p for p in fs.glob(path) if not fs.isdir(p)]
        if not found:
            raise ShardError(f"{where}: glob `{pattern}` matches no files")
    elif fs.isdir(path):
        found = fs.glob(path.rstrip("/") + "/*.tar")
        if not found:
            raise ShardError(f"{where}: folder `{pattern}` holds no *.tar shards")
    elif fs.exists(path):
        found = [path]
    else:
        raise ShardError(f"{where}: `{pattern}` does not exist")
    return [fs.unstrip_protocol(p) if _has_protocol(pattern) else p for p in sorted(found)]


def source_field(index: int | None) -> str:
    """The spec field that lists a source's shards, for error messages."""
    return "data.shards" if index is None else f"data.sources[{index}].shards"


def expand_sources(data) -> list[list[str]]:
    """The shard URLs of each source of a `TrainDataSpec` (`data.shards` is one source)."""
    if data.sources is None:
        return [expand_shards(data.shards, source_field(None))]
    return [expand_shards(src.shards, source_field(i)) for i, src in enumerate(data.sources)]


def _has_protocol(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


@dataclass
class SampleKeys:
    """Which member extensions make up a training sample."""

    image_exts: list[str]
    text_ext: str

    @classmethod
    def parse(cls, image_key: str, text_key: str) -> "SampleKeys":
        exts = [e.strip().lower().lstrip(".") for e in image_key.split(";") if e.strip()]
        if not exts:
            raise ShardError(f"data.image_key `{image_key}` names no extension")
        return cls(image_exts=exts, text_ext=text_key.strip().lower().lstrip("."))

    @property
    def fields(self) -> frozenset[str]:
        """The member extensions a sample is read with; other members are skipped unread."""
        return frozenset((*self.image_exts, self.text_ext))

    def complete(self, exts: set[str] | dict) -> bool:
        return self.text_ext in exts and any(e in exts for e in self.image_exts)


@dataclass
class RawSample:
    """One sample's undecoded bytes and where it came from (for error messages)."""

    key: str
    url: str
    image: bytes
    text: bytes


@dataclass
class ReadStats:
    """What reading skipped: incomplete samples and shards that ended in a broken tar."""

    incomplete: int = 0
    broken_shards: list[str] = field(default_factory=list)


def _skip_damage(stats: ReadStats) -> Handler:
    """Reading's error handler: a damaged shard ends with a warning and is recorded, not a crash; a member
    that repeats a field of its sample is left out with a warning."""

    def handle(exn: Exception) -> bool:
        if isinstance(exn, ShardReadError):
            log.warning("%s; skipping its remaining samples", exn)
            stats.broken_shards.append(exn.url)
        else:
            log.warning("%s; the first one is kept", exn)
        return True

    return handle


def _count_damage(exn: Exception) -> bool:
    """Counting's error handler: as reading's, so that counts equal what reading yields."""
    if isinstance(exn, ShardReadError):
        log.warning("%s; counting the samples before it", exn)
    else:
        log.warning("%s; the first one is kept", exn)
    return True


def iter_raw_samples(url: str, keys: SampleKeys, stats: ReadStats | None = None) -> Iterator[RawSample]:
    """Complete samples (an image of one of `keys.image_exts` and a caption) of one shard, in tar order."""
    stats = stats if stats is not None else ReadStats()
    for sample in iter_shard_samples(url, keys.fields, handler=_skip_damage(stats)):
        if not keys.complete(sample):
            stats.incomplete += 1
            continue
        image = next(sample[e] for e in keys.image_exts if e in sample)
        yield RawSample(key=sample["__key__"], url=url, image=image, text=sample[keys.text_ext])


def count_samples(url: str, keys: SampleKeys) -> int:
    """Complete samples in a shard, from the tar headers only (member data is skipped, not read): exactly the
    samples `iter_raw_samples` yields, a damaged shard's included."""
    return count_shard_samples(url, keys.complete, keys.fields, handler=_count_damage)
