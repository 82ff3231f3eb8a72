"""The embedding cache: feature arrays on any fsspec storage, keyed by content fingerprints.

An entry is one `.npz` file, `ROOT/<kind>/<key>.npz`, written to a temporary name and moved into
place, so a reader never sees half a file. Entries also live in memory for the rest of the job, so
several models sharing a tower in one suite embed it once even without a storage cache.
An unreadable entry is reported and recomputed, never fatal.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import uuid
from collections import Counter

import fsspec
import numpy as np

from clipforge.eval.fingerprint import digest_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def cache_key(**parts) -> str:
    """The key of an entry described by `parts` (JSON-serialisable), including the cache format version."""
    return digest_json({"format": FORMAT_VERSION, **parts})[:40]


class FeatureStore:
    """get/put of named arrays by (kind, key); `root` None keeps entries in memory only."""

    def __init__(self, root: str | None):
        self.root = root
        self.memory: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self.counts: Counter = Counter()
        if root is not None:
            self.fs, self.path = fsspec.core.url_to_fs(root)
        else:
            self.fs, self.path = None, None

    def _file(self, kind: str, key: str) -> str:
        return posixpath.join(self.path, kind, f"{key}.npz")

    def get(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        found = self.memory.get((kind, key))
        if found is None and self.fs is not None:
            found = self._read(kind, key)
            if found is not None:
                self.memory[(kind, key)] = found
        self.counts[f"{kind}_{'hits' if found is not None else 'misses'}"] += 1
        return found

    def _read(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        path = self._file(kind, key)
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files if name != "meta"}
        except Exception as e:  # noqa: BLE001 - any unreadable entry (bad zip, cut off, foreign) is recomputed
            log.warning("embedding cache: ignoring unreadable entry %s (%s); it will be recomputed", path, e)
            return None

    def put(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        self.memory[(kind, key)] = arrays
        self.counts[f"{kind}_writes"] += 1
        if self.fs is None:
            return
        buf = io.BytesIO()
        # mypy matches **arrays against savez's allow_pickle flag too; its keys are array names.
        np.savez(buf, meta=np.asarray(json.dumps(meta or {}, sort_keys=True, default=str)), **arrays)  # type: ignore[arg-type]
        path = self._file(kind, key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(buf.getvalue())
        self.fs.mv(tmp, path)
