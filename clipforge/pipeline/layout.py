"""Where a build's files live and how they are committed.

Layout under the output path (img2dataset's webdataset layout plus a manifest):
  00000.tar  00000.parquet  00000_stats.json  ...  manifest/00000.parquet  sizes.json  stats.json
sizes.json maps each tar's name to its number of samples (`{"00000.tar": 998, ...}`), the WebDataset
convention that open_clip's trainer reads to know a dataset's size without `--train-num-samples`.
No partial file is ever visible under its final name. On local (and other move-capable) filesystems
each file is written under a hidden temporary name in its final folder and moved into place when
complete. On S3 an object only appears once its upload completes, so files are written to their final
key directly: small ones in a single PUT, tars as a multipart upload that is completed on commit and
aborted on failure (a killed writer leaves an invisible upload, which the next attempt aborts).
A shard counts as done when its tar and its manifest exist; the manifest is committed last.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from clipforge.runtime.run_dir import BUILD_STATS_FILE

SHARD_DIGITS = 5
SIZES_FILE = "sizes.json"
_SHARD_FILE = re.compile(r"^(\d+)\.(tar|parquet)$")
# Object stores where a write is invisible until the upload completes, and a rename is a full copy.
_UPLOAD_ATOMIC_PROTOCOLS = frozenset({"s3", "s3a"})


def key_digits(samples_per_shard: int) -> int:
    """Digits of the in-shard index in a sample key (img2dataset: ceil(log10(samples_per_shard)))."""
    return math.ceil(math.log10(samples_per_shard)) if samples_per_shard > 1 else 0


def sample_key(shard: int, index: int, digits: int) -> str:
    """img2dataset's key: the shard number followed by the zero-padded index in the shard."""
    return f"{shard * 10**digits + index:0{digits + SHARD_DIGITS}d}"


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}"


class OutputLayout:
    """Paths and atomic writes under one output folder (local or fsspec)."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None):
        self.url = path
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(path, **self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.manifest_dir = f"{self.root}/manifest"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.upload_atomic = bool(_UPLOAD_ATOMIC_PROTOCOLS & set(protocols))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def portable_url(self) -> str:
        """The output location as other processes must name it: relative local paths made absolute
        (Ray workers need not share the driver's working directory)."""
        return self.root if self.is_local else self.url

    def tar(self, shard: int) -> str:
        return f"{self.root}/{shard_name(shard)}.tar"

    def parquet(self, shard: int) -> str:
        return f"{self.root}/{shard_name(shard)}.parquet"

    def shard_stats(self, shard: int) -> str:
        return f"{self.root}/{shard_name(shard)}_stats.json"

    def manifest(self, shard: int) -> str:
        return f"{self.manifest_dir}/{shard_name(shard)}.parquet"

    @property
    def stats(self) -> str:
        return f"{self.root}/{BUILD_STATS_FILE}"

    @property
    def sizes(self) -> str:
        return f"{self.root}/{SIZES_FILE}"

    def write_sizes(self, samples: dict[int, int]) -> None:
        """sizes.json from {shard: samples in its tar}; left untouched when it already says exactly that, so a
        re-run that changed nothing changes no file but stats.json."""
        wanted = {f"{shard_name(shard)}.tar": n for shard, n in sorted(samples.items())}
        try:
            if self.read_json(self.sizes) == wanted:
                return
        except (FileNotFoundError, ValueError):
            pass  # missing or unreadable: written below
        self.write_json(self.sizes, wanted)

    def make_dirs(self) -> None:
        self.fs.makedirs(self.manifest_dir, exist_ok=True)

    def _shards_in(self, folder: str, ext: str) -> set[int]:
        # Listings of remote filesystems are cached per process; other processes wrote since.
        self.fs.invalidate_cache(folder)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        found = set()
        for name in names:
            m = _SHARD_FILE.match(name.rstrip("/").rsplit("/", 1)[-1])
            if m and m.group(2) == ext:
                found.add(int(m.group(1)))
        return found

    def completed_shards(self) -> set[int]:
        """Shards whose tar and manifest both exist (listed once, not probed one by one)."""
        return self._shards_in(self.root, "tar") & self._shards_in(self.manifest_dir, "parquet")

    def manifest_shards(self) -> list[int]:
        return sorted(self._shards_in(self.manifest_dir, "parquet"))

    # -- atomic writes ------------------------------------------------------------------------

    def temp_for(self, final: str) -> str:
        folder, base = final.rsplit("/", 1)
        # Leading dot: hidden from globs like *.tar and skipped by pyarrow dataset discovery.
        return f"{folder}/.{base}.tmp-{uuid.uuid4().hex[:12]}"

    def commit(self, tmp: str, final: str) -> None:
        if self.is_local:
            os.replace(tmp, final)  # atomic on one filesystem
        else:
            self.fs.mv(tmp, final)

    def open_atomic(self, final: str) -> "AtomicFile":
        """A file written in pieces that appears under `final` only when committed."""
        return AtomicFile(self, final)

    def remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except (FileNotFoundError, OSError):
            pass

    def remove_stale_temps(self, shard: int) -> None:
        """Temporary files (or, on S3, unfinished uploads) a crashed attempt at this shard left behind."""
        name = shard_name(shard)
        if self.upload_atomic:
            self._abort_stale_uploads(self.tar(shard))
            return
        for folder in (self.root, self.manifest_dir):
            try:
                stale = self.fs.glob(f"{folder}/.{name}[._]*.tmp-*")
            except FileNotFoundError:
                continue
            for path in stale:
                self.remove_quietly(path)

    def remove_all_stale_temps(self) -> None:
        """Every temporary file (or unfinished upload) an earlier run of this build left, whatever it was
        doing when it died: downloading, committing or patching any shard, rewriting shards after the filters, or
        writing sizes.json or stats.json. Call it before this run writes anything."""
        if self.upload_atomic:
            self._abort_stale_uploads(f"{self.root}/", prefix_only=True)
            return
        for pattern in (f"{self.root}/.[0-9]*.tmp-*", f"{self.root}/.{BUILD_STATS_FILE}.tmp-*",
                        f"{self.root}/.{SIZES_FILE}.tmp-*", f"{self.manifest_dir}/.[0-9]*.tmp-*"):
            try:
                stale = self.fs.glob(pattern)
            except FileNotFoundError:
                continue
            for path in stale:
                self.remove_quietly(path)

    def _abort_stale_uploads(self, final: str, prefix_only: bool = False) -> None:
        """Abort the unfinished uploads to `final` (or, with `prefix_only`, to this build's files under it)."""
        # Best effort: an unfinished upload is invisible and harmless, it only costs storage until
        # the bucket's lifecycle rules drop it.
        try:
            bucket, key, _ = self.fs.split_path(final)
            for upload in self._multipart_uploads(bucket, key):
                name = upload.get("Key", "")
                ours = (_SHARD_FILE.match(name[len(key):]) is not None) if prefix_only else name == key
                if ours:
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=name, UploadId=upload["UploadId"])
        except Exception:  # noqa: BLE001 - never fail a build over housekeeping
            pass

    def _multipart_uploads(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        marker: dict[str, str] = {}
        while True:
            listing = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker)
            yield from listing.get("Uploads", [])
            if not listing.get("IsTruncated"):
                return
            marker = {"KeyMarker": listing["NextKeyMarker"], "UploadIdMarker": listing["NextUploadIdMarker"]}

    def write_bytes(self, final: str, data: bytes) -> None:
        if self.upload_atomic:
            self.fs.pipe_file(final, data)  # one upload: the object appears whole or not at all
            return
        tmp = self.temp_for(final)
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.commit(tmp, final)
        except BaseException:
            self.remove_quietly(tmp)
            raise

    def write_json(self, final: str, obj: Any) -> None:
        self.write_bytes(final, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())

    def write_table(self, final: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(final, buf.getvalue())

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        # Not pq.read_table: over a Python file object its dataset scanner leaves read-ahead futures that hold
        # the file and are released on an Arrow thread later; if that happens while the interpreter exits,
        # the thread cannot take the GIL and the process aborts (exit 134) after the job has succeeded.
        # A single-threaded ParquetFile read finishes all its I/O before returning.
        with self.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read(columns=columns, use_threads=False)

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.load(f)


class AtomicFile:
    """Write-only file that becomes visible under its final name on `commit()`; `discard()` leaves no trace.

    Local and generic filesystems: a hidden temporary file, moved into place on commit.
    S3: a multipart upload to the final key (autocommit off), completed on commit, aborted on discard.
    """

    def __init__(self, layout: OutputLayout, final: str):
        self.layout = layout
        self.final = final
        self.direct = layout.upload_atomic
        self.path = final if self.direct else layout.temp_for(final)
        # An fsspec file; in direct mode (S3) it has commit() and discard().
        self._file: Any = (layout.fs.open(final, "wb", autocommit=False) if self.direct
                           else layout.fs.open(self.path, "wb"))
        self._done = False

    def write(self, data: bytes) -> int:
        return self._file.write(data)

    def commit(self) -> None:
        self._file.close()
        if self.direct:
            self._file.commit()
        else:
            self.layout.commit(self.path, self.final)
        self._done = True

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        if self.direct:
            try:
                self._file.discard()
            finally:
                self._file.closed = True  # discarded: nothing may be flushed on close or garbage collection
            return
        try:
            self._file.close()
        finally:
            self.layout.remove_quietly(self.path)
