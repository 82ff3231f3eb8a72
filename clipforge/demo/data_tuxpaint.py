"""Tux Paint stamps: photos and drawings, each described by an English sentence in a .txt beside it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAMPS_PATH = "usr/share/tuxpaint/stamps"
# Tux Paint ships left/right-facing pairs as foo.png + foo_mirror.png that share foo.txt.
_MIRROR = "_mirror"


@dataclass(frozen=True)
class Stamp:
    png: Path
    relpath: str  # under the demo's images folder
    caption: str
    mirrored: bool


def list_stamps(root: Path) -> list[Stamp]:
    """Every stamp PNG that has a usable English description, sorted by path."""
    base = root / STAMPS_PATH
    if not base.is_dir():
        raise FileNotFoundError(f"{base} is missing: the tuxpaint-stamps-default package was not unpacked under {root}")
    out = []
    for png in sorted(base.rglob("*.png")):
        mirrored = png.stem.endswith(_MIRROR)
        stem = png.stem[: -len(_MIRROR)] if mirrored else png.stem
        caption = read_caption(png.with_name(stem + ".txt"))
        if caption:
            rel = png.relative_to(base).as_posix()
            out.append(Stamp(png=png, relpath=f"tuxpaint/{rel}", caption=caption, mirrored=mirrored))
    return out


def read_caption(txt: Path) -> str | None:
    """The description's first line is English; later lines are `lang.utf8=...` translations."""
    if not txt.is_file():
        return None
    lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines:
        return None
    # A few descriptions open with a dash as if continuing a sentence ("– Because a brain is ...").
    caption = " ".join(lines[0].split()).lstrip("-–— ").strip()
    if not caption or "=" in caption.split(" ", 1)[0]:
        return None
    return caption
