"""Finding WebDataset shards and reading their samples, without decoding anything.

Shards are plain tar files whose members are grouped into samples by key: the member name up to
the first dot of its base name (`dir/000123.jpg` and `dir/000123.txt` form sample `dir/000123`).
Paths may be local or any fsspec URL; folders and globs are expanded to the `*.tar` files they hold.
"""
from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from clipforge.errors import UserError
from clipforge.runtime.storage_errors import storage_errors

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
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


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


def split_member_name(name: str) -> tuple[str, str] | None:
    """`a/b/000123.txt.gz` -> (`a/b/000123`, `txt.gz`); names without an extension -> None."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1 :].lower()


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


def _iter_groups(url: str, stats: ReadStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive tar members grouped by key; a broken tar ends its shard with a warning, not a crash."""
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                k, ext = parts
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                data = tar.extractfile(member)
                group[ext] = data.read() if data is not None else b""
            cut_short = _ends_without_marker(f, tar)
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("shard %s is broken after key %s (%s); skipping its remaining samples", url, key, e)
        stats.broken_shards.append(url)
        return
    if key is not None:
        yield key, group
    if cut_short:
        log.warning("shard %s ends after key %s without the end-of-archive marker: it was cut short", url, key)
        stats.broken_shards.append(url)


def _ends_without_marker(f, tar: tarfile.TarFile) -> bool:
    """Whether an uncompressed tar stopped at a cut, not at its end-of-archive block of zeros.

    tarfile ends a stream silently when a header after the first is missing or cut, so a shard cut
    at a header boundary would otherwise look complete. Compressed streams cannot be checked this way.
    """
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return False
    f.seek(tar.offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) < tarfile.BLOCKSIZE or block.count(tarfile.NUL) != tarfile.BLOCKSIZE


def iter_raw_samples(url: str, keys: SampleKeys, stats: ReadStats | None = None) -> Iterator[RawSample]:
    """Complete samples (an image of one of `keys.image_exts` and a caption) of one shard, in tar order."""
    stats = stats if stats is not None else ReadStats()
    for key, group in _iter_groups(url, stats):
        if not keys.complete(group):
            stats.incomplete += 1
            continue
        image = next(group[e] for e in keys.image_exts if e in group)
        yield RawSample(key=key, url=url, image=image, text=group[keys.text_ext])


def count_samples(url: str, keys: SampleKeys) -> int:
    """Complete samples in a shard, from the tar headers only (member data is skipped, not read)."""
    exts_by_key: dict[str, set[str]] = {}
    order: list[str] = []
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:  # lazily, so a damaged tail keeps the headers before it
                parts = split_member_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                k, ext = parts
                if k not in exts_by_key:
                    exts_by_key[k] = set()
                    order.append(k)
                exts_by_key[k].add(ext)
    except (tarfile.TarError, OSError, EOFError) as e:
        # Readers stop at the same point, so the samples before the damage still count.
        log.warning("shard %s: cannot read all tar headers (%s); counting the readable ones", url, e)
    return sum(1 for k in order if keys.complete(exts_by_key[k]))
