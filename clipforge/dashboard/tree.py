"""Read-only access to the runs folder, local or fsspec, that never leaves it.

Paths inside the folder are '/'-separated strings relative to its root. A path that comes from a
request goes through `clean_relpath` (refuses '..', absolute paths, drive letters, backslashes,
percent signs left after URL decoding, i.e. double encoding) and, on local disks, `check_inside`
(refuses a symlink whose target is outside the root). Listings drop symlinks that point outside,
so whatever the folder walk finds is inside the root too.

Local folders are read with `os` directly: the folder walk of thousands of runs is several times
faster through os.scandir than through fsspec's generic listing. Every other URL goes through fsspec.
"""
from __future__ import annotations

import errno
import os
import re
from functools import partial
from typing import NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

_DRIVE = re.compile(r"^[A-Za-z]:")
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)


class PathRefused(ValueError):
    """A request named a path outside the runs folder (or one that could be read as such)."""


class PathNotFound(FileNotFoundError):
    """A request named a path that does not exist inside the runs folder."""


class Entry(NamedTuple):
    # A named tuple, not a dataclass: a folder scan creates one per file of thousands of runs.
    name: str
    is_dir: bool
    size: int  # -1: not looked up (listdir with stat=False)
    mtime: float  # seconds since the epoch; 0 when the filesystem does not say


# Entry(...) goes through the named tuple's Python-level __new__; a scan of thousands of runs makes tens
# of thousands of entries, so listings build them with tuple.__new__ directly (a third of the cost).
_new_entry = partial(tuple.__new__, Entry)


def clean_relpath(rel: str) -> str:
    """`rel` as a normalised path under the root, or PathRefused naming what is wrong with it."""
    if rel in ("", "."):
        return ""
    if len(rel) > 1024:
        raise PathRefused("path is too long")
    if any(ch in rel for ch in ("\\", "\x00", "%")):
        # '%' can only remain after the server's URL decoding if the client encoded twice.
        raise PathRefused(f"path {rel!r} contains a forbidden character")
    if rel.startswith(("/", "~")) or _DRIVE.match(rel) or "://" in rel:
        raise PathRefused(f"path {rel!r} is absolute; paths are relative to the runs folder")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PathRefused(f"path {rel!r} has an empty, '.' or '..' segment")
    return "/".join(parts)


def join_rel(*parts: str) -> str:
    return "/".join(p for p in parts if p)


class RunTree:
    """The runs folder. Subclasses implement listing and reading; nothing here writes."""

    url: str
    # Listings and reads that a scan may have in flight at once. Local reads are fast and CPU-bound: one at a
    # time. An object store answers each request after a round trip: many at once.
    parallel_requests: int = 1

    def listdir(self, rel: str, stat: bool = True) -> list[Entry]:
        """Entries of a folder; with `stat=False` files may come without size and time (cheaper locally)."""
        raise NotImplementedError

    def with_stats(self, rel: str, entries: list[Entry]) -> list[Entry]:
        """`entries` of folder `rel` (from listdir(stat=False)) with sizes and times filled in."""
        return entries

    def read_bytes(self, rel: str, start: int = 0, size: int = -1) -> bytes:
        """The file's bytes from `start` to its end. `size`, the size a listing gave, saves looking it up
        (a file that grew or shrank since is still read to its end)."""
        raise NotImplementedError

    def check_inside(self, rel: str) -> None:
        """Raise PathRefused if `rel` resolves outside the root (symlinks), PathNotFound if it does not exist."""
        raise NotImplementedError

    def location(self, rel: str) -> str:
        """A path or URL other libraries can open (used to load checkpoints)."""
        raise NotImplementedError

    def read_text(self, rel: str, size: int = -1) -> str:
        return self.read_bytes(rel, size=size).decode("utf-8", errors="replace")


class LocalTree(RunTree):
    def __init__(self, root: str):
        self.root = os.path.realpath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise PathNotFound(f"runs folder {root} does not exist or is not a folder")
        self.url = self.root

    def _abs(self, rel: str) -> str:
        if not rel:
            return self.root
        return self.root + os.sep + (rel if os.sep == "/" else rel.replace("/", os.sep))

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def listdir(self, rel: str, stat: bool = True) -> list[Entry]:
        out = []
        try:
            with os.scandir(self._abs(rel)) as it:
                for e in it:
                    try:
                        if e.is_symlink() and not self._inside(os.path.realpath(e.path)):
                            continue  # a link out of the runs folder is not part of it
                        if e.is_dir():
                            out.append(_new_entry((e.name, True, 0, 0.0)))  # folders' times are never used
                        elif not stat:
                            out.append(_new_entry((e.name, False, -1, 0.0)))
                        else:
                            st = e.stat()
                            out.append(_new_entry((e.name, False, st.st_size, st.st_mtime)))
                    except OSError:
                        continue  # vanished or dangling while we listed
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(f"{rel or '.'} is not a folder in the runs folder") from None
        return out

    def with_stats(self, rel: str, entries: list[Entry]) -> list[Entry]:
        base = self._abs(rel) + os.sep
        out = []
        for e in entries:
            if e.is_dir or e.size >= 0:
                out.append(e)
                continue
            try:
                st = os.stat(base + e.name)
            except OSError:
                continue  # removed since the listing
            out.append(_new_entry((e.name, False, st.st_size, st.st_mtime)))
        return out

    def read_bytes(self, rel: str, start: int = 0, size: int = -1) -> bytes:
        # Plain file descriptors: listing thousands of runs reads thousands of small files, and Python's
        # buffered file objects cost more than the reads themselves.
        fd = os.open(self._abs(rel), _READ_FLAGS)
        try:
            if start:
                os.lseek(fd, start, os.SEEK_SET)
            if size < 0:
                size = os.fstat(fd).st_size
            want = max(size - start, 0) + 1
            data = os.read(fd, want)
            if len(data) < want:
                return data  # short read: the end of the file
            chunks = [data]  # the file grew since its size was taken (a live metrics log): read on to its end
            while chunks[-1]:
                chunks.append(os.read(fd, 1 << 20))
            return b"".join(chunks)
        finally:
            os.close(fd)

    def check_inside(self, rel: str) -> None:
        real = os.path.realpath(self._abs(rel))
        if not self._inside(real):
            raise PathRefused(f"path {rel!r} leads outside the runs folder")
        if not os.path.exists(real):
            raise PathNotFound(f"{rel} does not exist in the runs folder")

    def location(self, rel: str) -> str:
        return self._abs(rel)


class FsspecTree(RunTree):
    """Object stores and other fsspec filesystems: no symlinks, so a clean relative path stays inside."""

    parallel_requests = 16

    def __init__(self, url: str):
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.url = url
        if not self.fs.isdir(self.root):
            raise PathNotFound(f"runs folder {url} does not exist or is not a folder")

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def listdir(self, rel: str, stat: bool = True) -> list[Entry]:
        try:
            entries = self.fs.ls(self._abs(rel), detail=True, refresh=True)
        except TypeError:  # filesystems without a listings cache take no `refresh`
            entries = self.fs.ls(self._abs(rel), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(f"{rel or '.'} is not a folder in the runs folder") from None
        out = []
        base = self._abs(rel).rstrip("/")
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e["name"].rstrip("/") == base or not name:
                continue
            out.append(Entry(name, e.get("type") == "directory", int(e.get("size") or 0), _mtime(e)))
        return out

    def read_bytes(self, rel: str, start: int = 0, size: int = -1) -> bytes:
        # One ranged GET, whatever the filesystem caches: opening a file object first looks up the object's
        # details, a second request where no listing of its folder is cached (a run page's first read).
        try:
            return self.fs.cat_file(self._abs(rel), start=start or None)
        except OSError as e:
            if start and e.errno == errno.EINVAL:  # S3 refuses a range that starts at or past the end
                return b""
            raise

    def check_inside(self, rel: str) -> None:
        if not self.fs.exists(self._abs(rel)):
            raise PathNotFound(f"{rel} does not exist in the runs folder")

    def location(self, rel: str) -> str:
        return self.fs.unstrip_protocol(self._abs(rel))


def _mtime(info: dict) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            from datetime import datetime

            return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return 0.0


def open_tree(url: str) -> RunTree:
    """The runs folder at `url` (a local path or any fsspec URL)."""
    fs, _ = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return LocalTree(fsspec.core.url_to_fs(url)[1])
    return FsspecTree(url)
