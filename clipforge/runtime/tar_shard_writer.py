"""Writing one WebDataset tar shard through webdataset's `TarWriter`.

A sample is a key and its fields (extension -> bytes); each becomes a member `<key>.<extension>`, a
sample's members in the order of their sorted extensions (webdataset's order, and so img2dataset's:
`.jpg`, `.json`, `.txt`). Members are USTAR, mode 0444, owned by `bigdata` as img2dataset writes them,
with one whole-second modification time per shard.

The stream is the caller's and stays open: where the shard must appear whole or not at all, the caller
passes an atomic file (the builder's `OutputLayout.open_atomic`: a hidden temporary file renamed into
place, or one multipart upload on S3) and commits it after `close()`.
"""
from __future__ import annotations

import tarfile
import time
from typing import Protocol

# webdataset is imported where it is used, never at import time: `import webdataset` imports torch
# (webdataset/__init__ -> compat -> pytorch): measured, 2.4 to 2.9 s and +258 MiB of private memory
# (USS) per process, and the builder's driver, which imports this module, does not otherwise need torch.


class ByteSink(Protocol):
    """Where a shard goes: anything with a binary `write` (a file, an atomic file, a buffer)."""

    def write(self, data: bytes, /) -> int: ...


class TarShardWriter:
    """Samples -> one tar on `stream`; `close()` ends the archive (the stream is left open)."""

    def __init__(self, stream: ByteSink, mtime: float | None = None):
        from webdataset import TarWriter

        # A whole second: a fractional time needs a pax header per member, which USTAR has no room for.
        self.mtime = int(time.time() if mtime is None else mtime)
        self._writer = TarWriter(stream, encoder=False, mtime=self.mtime)
        # TarWriter takes a `format` but does not pass it on to tarfile (webdataset 0.2.86 to 0.3.x), whose
        # default is PAX; the format only matters once the first member is written, so it is set here.
        self._writer.tarstream.format = tarfile.USTAR_FORMAT
        self.samples = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """One sample: a member `<key>.<extension>` per field. Field names starting with `_` are not written."""
        self._writer.write({"__key__": key, **fields})
        self.samples += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
