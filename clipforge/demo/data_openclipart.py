"""Open Clip Art Library drawings, captioned from the metadata in their SVG sources.

The PNG under usr/share/openclipart/png/<category>/<name>.png has its SVG at the same
name under svg/. The SVG's RDF block holds the work's title and keywords, but also
author names (inside publisher/creator agents), collection names used as titles for
hundreds of icons, and template titles copied from another drawing ("Clipart by
<author> - <other file>"). Captions use only what describes the picture.
"""
from __future__ import annotations

import functools
import hashlib
import html
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

PNG_PATH = "usr/share/openclipart/png"
SVG_PATH = "usr/share/openclipart/svg"

# The Fashion-MNIST zero-shot task needs every garment picture there is.
CLOTHING_FOLDERS = frozenset({"clothing", "clothes", "shoes", "fashion", "bags"})
CLOTHING_KEYWORDS = frozenset({"clothing", "clothes", "footwear", "shoes", "fashion"})
# A title shared by this many different pictures names a collection, not a picture.
COLLECTION_MIN_WORKS = 20
MAX_KEYWORDS = 3

_METADATA = re.compile(rb"<metadata\b.*?</metadata>", re.S)
_WORK = re.compile(rb"<cc:Work\b.*?</cc:Work>", re.S)
_AGENT_BLOCK = re.compile(rb"<dc:(publisher|creator|rights|contributor)\b.*?</dc:\1>", re.S)
_TITLE = re.compile(rb"<dc:title\b[^>]*>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(rb"<dc:subject\b[^>]*>(.*?)</dc:subject>", re.S)
_LI = re.compile(rb"<rdf:li\b[^>]*>(.*?)</rdf:li>", re.S)
_TAG = re.compile(r"<[^>]+>")

_TEMPLATE_TITLE = re.compile(r"^clip\s*art by .+? - ", re.I)
_COLLECTION_WORDS = re.compile(r"\b(collection|theme|icons|iconset|cliparts|submission|sibmission)\b", re.I)
_PUBLISHER_TITLES = frozenset({"open clip art library", "openclipart", "open clipart library"})
_VERSION_SUFFIX = re.compile(r"[\s#.\-]*(?:v\.?)?\d+$", re.I)
_JUNK_KEYWORD = re.compile(r"hash.*|0x[0-9a-f]+|[\W\d_]+")
_WORDS = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class SvgMeta:
    title: str | None
    keywords: tuple[str, ...]
    agents: tuple[str, ...]  # author / publisher names


@dataclass(frozen=True)
class ClipArt:
    png: Path
    relpath: str  # under the demo's images folder
    caption: str
    clothing: bool


def read_svg_metadata(svg: Path) -> SvgMeta:
    """The work's first own dc:title, its dc:subject keywords and the agent names, from an SVG's RDF block."""
    data = _read_through_metadata(svg)
    meta = _METADATA.search(data)
    if meta is None:
        return SvgMeta(None, (), ())
    work_match = _WORK.search(meta.group(0))
    work = work_match.group(0) if work_match else meta.group(0)
    agents = tuple(
        _text(t) for block in _AGENT_BLOCK.finditer(work) for t in _TITLE.findall(block.group(0)) if _text(t)
    )
    own = _AGENT_BLOCK.sub(b"", work)
    title_match = _TITLE.search(own)
    subject = _SUBJECT.search(own)
    keywords = tuple(k for k in (_text(li) for li in _LI.findall(subject.group(1))) if k) if subject else ()
    return SvgMeta(_text(title_match.group(1)) if title_match else None, keywords, agents)


def clean_title(title: str | None, stem: str) -> str | None:
    """A readable title, or None when the metadata has no usable one.

    Template titles ("Clipart by X - other_drawing") name the drawing they were copied
    from, so the file's own name is used instead.
    """
    if not title:
        return None
    text = title
    if _TEMPLATE_TITLE.match(title):
        # Some files were even named after the template title: keep the part after the credit.
        text = _TEMPLATE_TITLE.sub("", stem.replace("_", " "))
    text = text.replace("_", " ")
    text = re.sub(r"\s+-\s+", ", ", text)
    while True:
        shorter = _VERSION_SUFFIX.sub("", text).strip(" ,-#.")
        if shorter == text:
            break
        text = shorter
    text = " ".join(text.split())
    if sum(ch.isalpha() for ch in text) < 3 or text.lower() in _PUBLISHER_TITLES:
        return None
    return text


def build_caption(title: str, keywords: tuple[str, ...], agents: tuple[str, ...] = ()) -> str:
    """Title plus up to MAX_KEYWORDS keywords that add words, e.g. "red apple, fruit, food"."""
    names = {" ".join(a.lower().replace("_", " ").split()) for a in agents}
    seen = set(_WORDS.findall(title.lower()))
    parts = [title]
    for raw in keywords:
        keyword = " ".join(raw.lower().replace("_", " ").split())
        if (
            not keyword
            or keyword == "unsorted"
            or keyword in names
            or _JUNK_KEYWORD.fullmatch(keyword)
            # Run-together tag soup such as "collanttuttonudotassellocotone".
            or (" " not in keyword and len(keyword) > 20)
        ):
            continue
        words = set(_WORDS.findall(keyword))
        if words - seen:
            parts.append(keyword)
            seen |= words
            if len(parts) > MAX_KEYWORDS:
                break
    return ", ".join(parts)


def list_clipart(root: Path) -> tuple[list[ClipArt], Counter]:
    """One entry per distinct picture (by PNG content) with a usable caption, and counts of what was dropped."""
    png_base, svg_base = root / PNG_PATH, root / SVG_PATH
    if not png_base.is_dir() or not svg_base.is_dir():
        raise FileNotFoundError(
            f"{png_base} or {svg_base} is missing: openclipart-png/openclipart-svg were not unpacked under {root}"
        )
    # Reading 16,000 files takes seconds; repeated calls in one process reuse the result
    # unless the unpacked folders changed.
    stamp = (png_base.stat().st_mtime_ns, svg_base.stat().st_mtime_ns)
    clipart, stats = _list_clipart(png_base, svg_base, stamp)
    return list(clipart), Counter(stats)


@functools.lru_cache(maxsize=2)
def _list_clipart(png_base: Path, svg_base: Path, _stamp: tuple[int, int]) -> tuple[tuple[ClipArt, ...], Counter]:
    entries = []
    pngs = sorted(png_base.rglob("*.png"))
    for png, digest in zip(pngs, _content_keys(pngs)):
        rel = png.relative_to(png_base)
        svg = svg_base / rel.with_suffix(".svg")
        meta = read_svg_metadata(svg) if svg.is_file() else SvgMeta(None, (), ())
        folders = {part.lower() for part in rel.parts[:-1]}
        clothing = bool(folders & CLOTHING_FOLDERS) or bool(
            {k.lower() for k in meta.keywords} & CLOTHING_KEYWORDS
        )
        entries.append((digest, png, rel, meta, bool(folders & CLOTHING_FOLDERS), clothing))

    collections = _collection_titles((digest, meta.title) for digest, _, _, meta, _, _ in entries)
    by_digest: dict[str, list] = defaultdict(list)
    for entry in entries:
        by_digest[entry[0]].append(entry)

    stats: Counter = Counter(openclipart_files=len(entries), openclipart_duplicates=len(entries) - len(by_digest))
    out = []
    for group in by_digest.values():
        # Prefer the copy filed under a garment folder, so the clothing pictures keep their category path.
        group.sort(key=lambda e: (not e[4], e[2].as_posix()))
        chosen = None
        for _, png, rel, meta, _, _ in group:
            if meta.title and not _TEMPLATE_TITLE.match(meta.title) and _norm(meta.title) in collections:
                continue
            title = clean_title(meta.title, png.stem)
            if title:
                chosen = ClipArt(
                    png=png,
                    relpath=f"openclipart/{rel.as_posix()}",
                    caption=build_caption(title, meta.keywords, meta.agents),
                    clothing=any(e[5] for e in group),
                )
                break
        if chosen is None:
            stats["openclipart_no_title"] += 1
        else:
            out.append(chosen)
    out.sort(key=lambda c: c.relpath)
    return tuple(out), stats


def _read_through_metadata(svg: Path, chunk: int = 1 << 16) -> bytes:
    """The SVG's bytes up to the end of its metadata block (usually near the top), or the whole file."""
    data = b""
    with svg.open("rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return data
            data += block
            # Search only the new tail (plus overlap for a tag cut in two) to keep this linear.
            if b"</metadata>" in data[-(len(block) + 16):]:
                return data


def _content_keys(pngs: list[Path]) -> list[str]:
    """A key equal for byte-identical files: the size, plus a digest only where sizes collide."""
    sizes = [p.stat().st_size for p in pngs]
    shared = {size for size, n in Counter(sizes).items() if n > 1}
    return [
        f"{size}:{hashlib.md5(p.read_bytes()).hexdigest()}" if size in shared else str(size)
        for p, size in zip(pngs, sizes)
    ]


def _collection_titles(pairs) -> set[str]:
    pictures: dict[str, set[str]] = defaultdict(set)
    for digest, title in pairs:
        if title:
            pictures[_norm(title)].add(digest)
    return {
        title
        for title, digests in pictures.items()
        if len(digests) >= COLLECTION_MIN_WORKS or _COLLECTION_WORDS.search(title)
    }


def _text(raw: bytes) -> str:
    return " ".join(html.unescape(_TAG.sub(" ", raw.decode("utf-8", errors="replace"))).split())


def _norm(title: str) -> str:
    return " ".join(title.lower().split())
