"""The demo's real offline data set: image-caption lists, a held-out retrieval set and a zero-shot benchmark.

Sources (all Debian packages, see clipforge.demo.debian): Noto Color Emoji rendered with
their Unicode names, Open Clip Art drawings captioned from their SVG metadata, and Tux
Paint stamps with their English descriptions; Fashion-MNIST test images for zero-shot
classification.

Output under out_dir:
    images/{emoji,openclipart,tuxpaint}/...   the "web" images, served over HTTP by the demo
    fashion/<i>_<class>/*.png                 zero-shot benchmark, one folder per class
    train.parquet, heldout.parquet            columns path (relative to images/), caption, source
    demo_data.json                            counts, licences, class names; written last

Held-out captions are Tux Paint descriptions whose images (and every other image with
the same normalised caption) never enter the training list, so retrieval on them
measures generalisation rather than memorisation.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote

import pandas as pd
from PIL import Image

from clipforge.demo import data_emoji, data_fashion, data_openclipart, data_tuxpaint
from clipforge.demo.data_images import ImageSkipped, is_blank, load_web_image, save_png_atomic
from clipforge.demo.data_licenses import source_licenses
from clipforge.demo.debian import fetch_packages

log = logging.getLogger(__name__)

# Bump when the selection or conversion changes, so existing outputs are rebuilt.
FORMAT_VERSION = 1
SOURCES = ("emoji", "openclipart", "tuxpaint")
LIST_COLUMNS = ("path", "caption", "source")
MANIFEST = "demo_data.json"
FORMAT_MARKER = ".format_version"


@dataclass
class DemoData:
    root: Path  # the out_dir
    images_dir: Path  # served over HTTP; every listed path is relative to it
    train_list: Path  # parquet: path, caption, source ('emoji' | 'openclipart' | 'tuxpaint')
    heldout_list: Path  # same columns; Tux Paint only, captions unique and absent from training
    fashion_dir: Path  # one folder per class, folder names sort into class-index order
    fashion_classnames: list[str]  # prompt names in class-index order
    counts: dict[str, int] = field(default_factory=dict)
    licenses: dict[str, str] = field(default_factory=dict)  # source -> short licence statement


@dataclass(frozen=True)
class _Item:
    source: str
    relpath: str
    caption: str
    make: Callable[[], Image.Image] = field(compare=False, repr=False)


def normalize_caption(text: str) -> str:
    """Lower case, single spaces, no punctuation at either end: how captions are compared for leaks."""
    text = " ".join(text.lower().split())
    start, end = 0, len(text)
    while start < end and (_is_punct(text[start]) or text[start].isspace()):
        start += 1
    while end > start and (_is_punct(text[end - 1]) or text[end - 1].isspace()):
        end -= 1
    return text[start:end]


def prepare_demo_data(
    cache_dir: Path,
    out_dir: Path,
    *,
    max_train: int = 4500,
    heldout: int = 300,
    fashion_per_class: int = 100,
    seed: int = 0,
) -> DemoData:
    """Fetch the packages (cached), choose and convert the images, write the lists; reuse a finished out_dir.

    Training list: every Tux Paint stamp not held out, every clothing-like clip-art
    picture, then a seeded random mix of emoji and other clip art up to `max_train`.
    When `max_train` is too small for all stamps and clothing, they get at most half and
    a quarter of it, so every source is still represented. Only chosen items are converted;
    one that turns out unreadable, oversized or blank is counted and replaced by the next.
    """
    if max_train < 1 or heldout < 0 or fashion_per_class < 0:
        raise ValueError(
            f"prepare_demo_data: need max_train >= 1, heldout >= 0, fashion_per_class >= 0 "
            f"(got {max_train}, {heldout}, {fashion_per_class})"
        )
    out_dir = Path(out_dir)
    params = {
        "format_version": FORMAT_VERSION,
        "max_train": max_train,
        "heldout": heldout,
        "fashion_per_class": fashion_per_class,
        "seed": seed,
    }
    existing = _load_if_complete(out_dir, params)
    if existing is not None:
        return existing

    started = time.monotonic()
    root = fetch_packages(Path(cache_dir))
    images_dir, fashion_dir = out_dir / "images", out_dir / "fashion"
    _start_build(out_dir, (images_dir, fashion_dir))
    rng = random.Random(seed)
    counts: Counter = Counter()

    stamps = data_tuxpaint.list_stamps(root)
    held = _choose_heldout(stamps, heldout, rng, images_dir, counts)
    held_captions = {normalize_caption(item.caption) for item in held}
    train = _choose_train(root, stamps, held_captions, max_train, rng, images_dir, counts)
    fashion_files = data_fashion.write_fashion(root, fashion_dir, fashion_per_class)

    for source in SOURCES:
        counts[f"train_{source}"] = sum(item.source == source for item in train)
    counts["train"] = len(train)
    counts["heldout"] = len(held)
    counts["fashion"] = len(fashion_files)
    _remove_stale(images_dir, {images_dir / item.relpath for item in train + held})
    _remove_stale(fashion_dir, set(fashion_files))

    data = DemoData(
        root=out_dir,
        images_dir=images_dir,
        train_list=out_dir / "train.parquet",
        heldout_list=out_dir / "heldout.parquet",
        fashion_dir=fashion_dir,
        fashion_classnames=list(data_fashion.PROMPT_NAMES),
        counts=dict(sorted(counts.items())),
        licenses=source_licenses(root),
    )
    _write_list(train, data.train_list)
    _write_list(sorted(held, key=lambda item: item.relpath), data.heldout_list)
    _write_manifest(data, params)
    log.info(
        "demo data ready in %.0f s: %d train (%s), %d held out, %d fashion images under %s",
        time.monotonic() - started,
        len(train),
        ", ".join(f"{counts[f'train_{s}']} {s}" for s in SOURCES),
        len(held),
        len(fashion_files),
        out_dir,
    )
    return data


def write_url_list(list_path: Path, base_url: str, out_path: Path) -> Path:
    """Turn a path list into a URL list (url, caption, source) for images served at `base_url`."""
    frame = pd.read_parquet(list_path)
    missing = [c for c in LIST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{list_path}: missing column(s) {missing}; expected {list(LIST_COLUMNS)}")
    base = base_url.rstrip("/")
    urls = pd.DataFrame(
        {
            "url": [f"{base}/{quote(str(p))}" for p in frame["path"]],
            "caption": frame["caption"].astype(str),
            "source": frame["source"].astype(str),
        }
    )
    out_path = Path(out_path)
    _atomic_parquet(urls, out_path)
    return out_path


def _choose_heldout(
    stamps: list[data_tuxpaint.Stamp], wanted: int, rng: random.Random, images_dir: Path, counts: Counter
) -> list[_Item]:
    """One stamp for each of `wanted` seeded-random distinct captions."""
    groups: dict[str, list[data_tuxpaint.Stamp]] = defaultdict(list)
    for stamp in stamps:
        groups[normalize_caption(stamp.caption)].append(stamp)
    captions = sorted(groups)
    rng.shuffle(captions)
    held: list[_Item] = []
    for caption in captions:
        if len(held) >= wanted:
            break
        # Prefer the original over the mirrored copy Tux Paint ships for some stamps.
        members = [s for s in groups[caption] if not s.mirrored] or groups[caption]
        held += _convert(_stamp_items([members[rng.randrange(len(members))]]), 1, images_dir, counts)
    if len(held) < wanted:
        log.warning("only %d held-out captions available (asked for %d)", len(held), wanted)
    return held


def _choose_train(
    root: Path,
    stamps: list[data_tuxpaint.Stamp],
    held_captions: set[str],
    max_train: int,
    rng: random.Random,
    images_dir: Path,
    counts: Counter,
) -> list[_Item]:
    def allowed(items: Iterable[_Item]) -> list[_Item]:
        return [item for item in items if normalize_caption(item.caption) not in held_captions]

    clipart, clip_stats = data_openclipart.list_clipart(root)
    counts.update(clip_stats)
    tuxpaint = allowed(_stamp_items(stamps))
    clothing = allowed(_clipart_items([c for c in clipart if c.clothing]))
    other = allowed(_clipart_items([c for c in clipart if not c.clothing]) + _emoji_items(root))
    for items in (tuxpaint, clothing, other):
        rng.shuffle(items)

    if len(clothing) + len(tuxpaint) <= max_train:
        n_clothing, n_tuxpaint = len(clothing), len(tuxpaint)
    else:
        n_clothing = min(len(clothing), max_train // 4)
        n_tuxpaint = min(len(tuxpaint), max_train // 2)
    chosen = _convert(clothing, n_clothing, images_dir, counts)
    counts["train_openclipart_clothing"] = len(chosen)
    chosen += _convert(tuxpaint, n_tuxpaint, images_dir, counts)
    chosen += _convert(other, max_train - len(chosen), images_dir, counts)
    rng.shuffle(chosen)  # sources interleaved, so every shard of the list holds a mix
    return chosen


def _convert(items: Iterable[_Item], target: int, images_dir: Path, counts: Counter) -> list[_Item]:
    """Convert items in order until `target` succeeded; an existing output file is reused as is."""
    done: list[_Item] = []
    for item in items:
        if len(done) >= target:
            break
        dest = images_dir / item.relpath
        if not dest.is_file():
            try:
                img = item.make()
            except ImageSkipped as exc:
                counts[f"skipped_{exc.reason}"] += 1
                log.debug("skipping %s: %s", item.relpath, exc)
                continue
            save_png_atomic(img, dest)
        done.append(item)
    return done


def _stamp_items(stamps: Iterable[data_tuxpaint.Stamp]) -> list[_Item]:
    return [
        _Item("tuxpaint", s.relpath, s.caption, functools.partial(load_web_image, s.png)) for s in stamps
    ]


def _clipart_items(clipart: Iterable[data_openclipart.ClipArt]) -> list[_Item]:
    return [
        _Item("openclipart", c.relpath, c.caption, functools.partial(load_web_image, c.png)) for c in clipart
    ]


def _emoji_items(root: Path) -> list[_Item]:
    return [
        _Item("emoji", e.relpath, e.name, functools.partial(_render_emoji_checked, root, e))
        for e in data_emoji.list_emoji(root)
    ]


def _render_emoji_checked(root: Path, emoji: data_emoji.Emoji) -> Image.Image:
    img = data_emoji.render_emoji(root, emoji)
    if is_blank(img):
        raise ImageSkipped("blank", f"emoji {emoji.name!r} renders as an empty square")
    return img


def _start_build(out_dir: Path, converted: tuple[Path, ...]) -> None:
    """Converted files are reused across runs, but only those written by this FORMAT_VERSION."""
    marker = out_dir / FORMAT_MARKER
    try:
        written_by = marker.read_text().strip()
    except OSError:
        written_by = None
    if written_by == str(FORMAT_VERSION):
        return
    for folder in converted:
        if folder.exists() and any(folder.iterdir()):
            if written_by is None:
                # Stale files get deleted later: never do that to a folder this code did not write.
                raise FileExistsError(
                    f"{folder} exists but was not written by prepare_demo_data; "
                    f"use an empty or dedicated output folder instead of {out_dir}"
                )
            log.info("removing %s: written by another version of the demo data code", folder)
            shutil.rmtree(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{FORMAT_VERSION}\n")


def _remove_stale(folder: Path, keep: set[Path]) -> None:
    """Delete files a run with other settings left behind, so the folder holds exactly this data set."""
    if not folder.is_dir():
        return
    for dirpath, _, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            if path not in keep:
                path.unlink()
        if Path(dirpath) != folder and not os.listdir(dirpath):
            os.rmdir(dirpath)


def _write_list(items: list[_Item], path: Path) -> None:
    frame = pd.DataFrame(
        {
            "path": [i.relpath for i in items],
            "caption": [i.caption for i in items],
            "source": [i.source for i in items],
        },
        columns=list(LIST_COLUMNS),
    )
    _atomic_parquet(frame, path)


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _write_manifest(data: DemoData, params: dict) -> None:
    manifest = {
        "params": params,
        "counts": data.counts,
        "licenses": data.licenses,
        "fashion_classnames": data.fashion_classnames,
        "fashion_folders": data_fashion.class_folders(),
    }
    path = data.root / MANIFEST
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _load_if_complete(out_dir: Path, params: dict) -> DemoData | None:
    """The DemoData of a finished earlier run with the same settings whose files are all still there."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params:
        return None
    data = DemoData(
        root=out_dir,
        images_dir=out_dir / "images",
        train_list=out_dir / "train.parquet",
        heldout_list=out_dir / "heldout.parquet",
        fashion_dir=out_dir / "fashion",
        fashion_classnames=list(manifest.get("fashion_classnames", [])),
        counts=dict(manifest.get("counts", {})),
        licenses=dict(manifest.get("licenses", {})),
    )
    try:
        paths = [
            p for listed in (data.train_list, data.heldout_list)
            for p in pd.read_parquet(listed, columns=["path"])["path"]
        ]
    except (OSError, ValueError, KeyError):
        return None
    if not all((data.images_dir / p).is_file() for p in paths):
        return None
    folders = manifest.get("fashion_folders", [])
    if sum(1 for folder in folders for _ in (data.fashion_dir / folder).glob("*.png")) != data.counts.get("fashion"):
        return None
    return data


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")
