"""Fetching the demo's source packages from Debian's archive into a local cache.

The demo trains on real, freely licensed data that Debian already packages, so the
only network access needed is `apt-get download`. Each step leaves a marker only
once it has finished, so an interrupted run redoes just the unfinished package and
a run with a complete cache touches no network at all.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from clipforge.errors import UserError

log = logging.getLogger(__name__)

DEMO_PACKAGES: tuple[str, ...] = (
    "fonts-noto-color-emoji",
    "unicode-data",
    "tuxpaint-stamps-default",
    "openclipart-png",
    "openclipart-svg",
    "dataset-fashion-mnist",
)

_MARKERS = ".clipforge-extracted"


class PackageFetchError(UserError, RuntimeError):
    """A demo package could not be downloaded or unpacked."""


def fetch_packages(cache_dir: Path, packages: tuple[str, ...] | list[str] = DEMO_PACKAGES) -> Path:
    """Download and unpack `packages` under `cache_dir`; return the unpacked root (it holds usr/share/...).

    Layout: cache_dir/debs/<package>_<version>_<arch>.deb and cache_dir/root/. A .deb
    already in cache_dir/debs (for instance copied there on an offline machine) is used as is.
    """
    cache_dir = Path(cache_dir)
    debs_dir = cache_dir / "debs"
    root = cache_dir / "root"
    markers = root / _MARKERS
    pending = [p for p in packages if not (markers / p).is_file()]
    if not pending:
        return root
    debs_dir.mkdir(parents=True, exist_ok=True)
    markers.mkdir(parents=True, exist_ok=True)
    for package in pending:
        deb = _cached_deb(debs_dir, package) or _download(package, debs_dir)
        _extract(deb, root, package)
        (markers / package).write_text(deb.name + "\n")
    return root


def _cached_deb(debs_dir: Path, package: str) -> Path | None:
    found = sorted(debs_dir.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _download(package: str, debs_dir: Path) -> Path:
    _require_tool("apt-get", package)
    log.info("downloading Debian package %s", package)
    error = _apt_download(package, debs_dir)
    if error is not None:
        # A fresh machine often has no package lists yet: refresh them once and retry.
        log.info("apt-get download %s failed; running apt-get update and retrying once", package)
        _apt_update(package)
        error = _apt_download(package, debs_dir)
    if error is not None:
        raise PackageFetchError(f"could not download Debian package {package!r}: {error}")
    deb = _cached_deb(debs_dir, package)
    if deb is None:
        raise PackageFetchError(f"apt-get download {package} succeeded but left no {package}_*.deb in {debs_dir}")
    return deb


def _apt_download(package: str, debs_dir: Path) -> str | None:
    """Download into a private folder, then move the finished .deb into place; return an error text or None."""
    with tempfile.TemporaryDirectory(prefix=f".{package}-", dir=debs_dir) as tmp:
        proc = subprocess.run(
            ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, check=False
        )
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            return _tail(proc.stderr or proc.stdout) or f"apt-get exited with status {proc.returncode}"
        # The partial .deb never appears under its final name, so a crash here leaves no half file.
        os.replace(debs[-1], debs_dir / debs[-1].name)
    return None


def _apt_update(package: str) -> None:
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise PackageFetchError(
            f"cannot download Debian package {package!r}: the package lists are probably missing. "
            "Run `sudo apt-get update` once, then retry."
        )
    proc = subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PackageFetchError(
            f"cannot download Debian package {package!r}: `apt-get update` failed: {_tail(proc.stderr)}"
        )


def _extract(deb: Path, root: Path, package: str) -> None:
    _require_tool("dpkg", package)
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg", "-x", str(deb), str(root)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PackageFetchError(
            f"could not unpack {deb} (package {package!r}): {_tail(proc.stderr)}. "
            "Delete the file to download it again."
        )


def _require_tool(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise PackageFetchError(
            f"cannot fetch Debian package {package!r}: `{tool}` is not installed. The demo data comes from "
            f"Debian's archive: run on Debian/Ubuntu, or put the .deb files into the cache's debs/ folder."
        )


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
