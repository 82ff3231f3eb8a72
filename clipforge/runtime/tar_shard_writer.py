"""Writing one WebDataset tar shard with the standard library's `tarfile`.

A sample is a key and its fields (extension -> bytes); each becomes a member `<key>.<extension>`, a
sample's members in the order of their sorted extensions (webdataset's `TarWriter` order, and so
img2dataset's: `.jpg`, `.json`, `.txt`). Members are USTAR, mode 0444, owned by `bigdata` as webdataset
and img2dataset write them, with one whole-second modification time per shard: the bytes equal those of
`webdataset.TarWriter(stream, encoder=False, mtime=...)` with the USTAR format (tests/unit/test_tar_shard_io.py
compares them).

Not webdataset's TarWriter itself: `import webdataset` imports torch (webdataset/__init__ -> compat ->
pytorch), measured at +480 MiB RSS in the build's driver once its filters rewrite shards and 650-800 MiB
per Ray worker; the builder otherwise never needs torch.

The stream is the caller's and stays open: where the shard must appear whole or not at all, the caller
passes an atomic file (the builder's `OutputLayout.open_atomic`: a hidden temporary file renamed into
place, or one multipart upload on S3) and commits it after `close()`.
"""
from __future__ import annotations

import io
import tarfile
import time
from typing import Protocol

OWNER = "bigdata"
MODE = 0o444


class ByteSink(Protocol):
    """Where a shard goes: anything with a binary `write` (a file, an atomic file, a buffer)."""

    def write(self, data: bytes, /) -> int: ...


class TarShardWriter:
    """Samples -> one tar on `stream`; `close()` ends the archive (the stream is left open)."""

    def __init__(self, stream: ByteSink, mtime: float | None = None):
        # A whole second: a fractional time needs a pax header per member, which USTAR has no room for.
        self.mtime = int(time.time() if mtime is None else mtime)
        # tarfile only writes to the stream; it is typed for binary files, of which a sink is the writing half.
        self._tar = tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]
        self.samples = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """One sample: a member `<key>.<extension>` per field. Field names starting with `_` are not written.

        Every field is checked before the first member is written, so a refused sample leaves nothing behind.
        """
        members = sorted((name, value) for name, value in fields.items() if not name.startswith("_"))
        for name, value in members:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"sample {key!r}: field {name} doesn't map to a bytes value "
                                 f"({type(value).__name__})")
        for name, value in members:
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(value)
            info.mtime = self.mtime
            info.mode = MODE
            info.uname = info.gname = OWNER
            self._tar.addfile(info, io.BytesIO(value))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
