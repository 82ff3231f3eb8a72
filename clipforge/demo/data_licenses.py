"""Short licence statements for each demo data source, read from the packages' debian/copyright files."""
from __future__ import annotations

import fnmatch
from pathlib import Path

# DEP-5 short names -> the names people usually know them by.
_SHORT_NAMES = {"SIL-1.1": "OFL-1.1", "OFL-1.1": "OFL-1.1", "Expat": "MIT", "MIT": "MIT"}
# Copyright files that predate the machine-readable format, recognised by their wording.
_PHRASES = (
    ("Public Domain Dedication", "public domain (Creative Commons Public Domain Dedication)"),
    ("UNICODE, INC. LICENSE AGREEMENT", "Unicode-DFS"),
)

# Which upstream file each source's pictures or text come from, to pick the right DEP-5 paragraph.
_SOURCES = {
    "emoji": (
        ("fonts-noto-color-emoji", "fonts/NotoColorEmoji.ttf", "font"),
        ("unicode-data", "emoji/emoji-test.txt", "names"),
    ),
    "openclipart": (("openclipart-png", "png/x.png", ""),),
    "tuxpaint": (("tuxpaint-stamps-default", "stamps/x.png", ""),),
    "fashion": (("dataset-fashion-mnist", "data/fashion/t10k-images-idx3-ubyte.gz", ""),),
}


def package_license(root: Path, package: str, upstream_file: str = "x") -> str:
    """The licence that debian/copyright gives for `upstream_file`, as a short name."""
    path = root / "usr/share/doc" / package / "copyright"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: package {package!r} was not unpacked under {root}")
    text = path.read_text(encoding="utf-8", errors="replace")
    paragraphs = [_fields(block) for block in text.split("\n\n")]
    if "format" in paragraphs[0]:
        # DEP-5: the last Files paragraph matching the file wins.
        license_name = None
        for para in paragraphs:
            globs = para.get("files", "").split()
            if any(fnmatch.fnmatchcase(upstream_file, g) for g in globs) and para.get("license"):
                license_name = para["license"].splitlines()[0].strip()
        if license_name:
            return _SHORT_NAMES.get(license_name, license_name)
    for phrase, statement in _PHRASES:
        if phrase.lower() in text.lower():
            return statement
    return f"see /usr/share/doc/{package}/copyright"


def source_licenses(root: Path) -> dict[str, str]:
    """{'emoji': ..., 'openclipart': ..., 'tuxpaint': ..., 'fashion': ...}."""
    out = {}
    for source, parts in _SOURCES.items():
        statements = []
        for package, upstream_file, role in parts:
            name = package_license(root, package, upstream_file)
            statements.append(f"{name} ({role})" if role else name)
        out[source] = "; ".join(statements)
    return out


def _fields(block: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in block.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields
