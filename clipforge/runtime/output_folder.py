"""Which folders a job may write into, decided before it writes anything.

A job writes only into a folder that is (a) missing or empty, (b) its own earlier output, or (c) named
with `overwrite: true`. Its own output is recognised by `.clipforge-output`, which the job writes
first, holding its kind and name (JSON): a re-run of the same job resumes there, any other job is refused.
The marker was `.clipforge-job.json` before; folders marked so are recognised, and their own job's next run
renames the marker (a `*.json` file beside an eval's results broke `clip_benchmark build`, which reads every
`*.json` of the folder as a result).
Folders written before that file existed are recognised by their contents: every entry must be a name
the job itself writes, and one of its signature entries must be present (a build's `manifest/`, a
training run's `spec.yaml` or `checkpoints/`: a run folder seeded with another run's checkpoints
resumes from them), so a folder holding a user's own files is never taken for one.
A refusal changes nothing and names the field, the folder and what it holds.
"""
from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass

import fsspec

from clipforge.errors import OutputFolderError
from clipforge.runtime.storage_errors import storage_errors

MARKER = ".clipforge-output"
LEGACY_MARKER = ".clipforge-job.json"
_SHOWN = 3  # entries named in a refusal


@dataclass(frozen=True)
class OutputOwner:
    """The job that claims a folder, and the names it writes there (for folders made before the marker)."""

    kind: str
    name: str
    field: str  # the spec field naming the folder, for messages
    own_names: tuple[str, ...] = ()  # fnmatch patterns of the top-level entries the job writes
    signature: tuple[str, ...] = ()  # entries only this kind of job writes; one is needed to adopt an unmarked folder


def _entries(fs, root: str) -> list[str] | None:
    """Top-level entry names of `root`, or None when it does not exist."""
    fs.invalidate_cache()
    if not fs.exists(root):
        return None
    if not fs.isdir(root):
        return []  # a file: reported as not a folder by the caller
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))


def _read_marker(fs, root: str, name: str = MARKER) -> dict:
    try:
        with fs.open(f"{root}/{name}", "r", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}  # unreadable: someone else's file of that name, owned by no job


def folder_owner(url: str, storage_options: dict | None = None) -> tuple[str, str] | None:
    """(kind, name) of the job whose marker the folder holds, ("?", "?") for a marker no job wrote, None for none.

    Reads only; storage errors propagate to the caller."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/") or root
    for name in (MARKER, LEGACY_MARKER):
        if fs.exists(f"{root}/{name}"):
            mark = _read_marker(fs, root, name)
            return (str(mark["kind"]), str(mark.get("name"))) if mark.get("kind") else ("?", "?")
    return None


def _write_marker(fs, root: str, owner: OutputOwner) -> None:
    fs.makedirs(root, exist_ok=True)
    record = {"kind": owner.kind, "name": owner.name, "claimed_at": time.time()}
    with fs.open(f"{root}/{MARKER}", "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if fs.exists(f"{root}/{LEGACY_MARKER}"):
        fs.rm(f"{root}/{LEGACY_MARKER}")  # the folder's owner is now recorded under the new name


def _ours(entries: list[str], owner: OutputOwner) -> bool:
    if not set(owner.signature) & set(entries):
        return False
    return all(any(fnmatch.fnmatchcase(e, pattern) for pattern in owner.own_names) for e in entries)


def _listing(entries: list[str]) -> str:
    shown = ", ".join(f"`{e}`" for e in entries[:_SHOWN])
    return shown + (f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else "")


def claim_output_folder(url: str, owner: OutputOwner, overwrite: bool = False,
                        storage_options: dict | None = None) -> bool:
    """Make `url` the output folder of `owner`, or raise OutputFolderError (nothing written).

    Returns True when the folder already held this job's output (a re-run), False when it starts fresh.
    Storage failures (no credentials, unreachable endpoint) become a StorageError naming the field.
    """
    where = f"field `{owner.field}`: {url}"
    with storage_errors(owner.field, url):
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        root = root.rstrip("/") or root
        entries = _entries(fs, root)
        if entries is not None and not fs.isdir(root):
            raise OutputFolderError(f"{where}: is a file, not a folder")
        if not entries:
            _write_marker(fs, root, owner)
            return False
        marker = next((name for name in (MARKER, LEGACY_MARKER) if name in entries), None)
        if marker is not None:
            mark = _read_marker(fs, root, marker)
            if (mark.get("kind"), mark.get("name")) == (owner.kind, owner.name):
                if marker == LEGACY_MARKER:
                    _write_marker(fs, root, owner)
                return True
            if not overwrite:
                what = (f"the output of another clipforge job (`{mark.get('kind')}` job `{mark.get('name')}`)"
                        if mark.get("kind") else f"a `{marker}` that no clipforge job wrote")
                raise OutputFolderError(f"{where}: holds {what}; choose another folder, or set overwrite: true "
                                        "to write into it anyway")
        elif _ours(entries, owner):
            _write_marker(fs, root, owner)
            return True
        elif not overwrite:
            raise OutputFolderError(f"{where}: is not empty and was not written by this {owner.kind} job (it holds "
                                    f"{_listing(entries)}); choose a new or empty folder, or set overwrite: true to "
                                    "write into it anyway (files of the same names are replaced)")
        _write_marker(fs, root, owner)
        return False
