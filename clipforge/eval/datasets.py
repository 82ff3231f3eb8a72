"""Evaluation datasets read from storage: caption WebDataset shards, image-path + caption tables,
class-per-folder image trees, IDX files.

The loaders return light "items" (`{"idx", "bytes"}` or `{"idx", "path", "stamp"}`) that the Ray Data
embedding pipeline decodes in parallel; nothing is decoded here. `stamp` (size and modification
time) identifies a file's version for the embedding cache without reading it.

Shards are read with clipforge.runtime.tar_shard_reader: consecutive members that share a key form a
sample, and a damaged shard (not a tar, cut short) is an error that names it, never a silently
smaller evaluation set.
"""
from __future__ import annotations

import ast
import io
import json
import posixpath
import re

import fsspec
from fsspec.core import url_to_fs

from clipforge.runtime.tar_shard_reader import iter_shard_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _expand(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a folder (its files with one of `suffixes`) or a glob -> sorted full URLs."""
    fs, root = url_to_fs(path)
    if _GLOB_CHARS.search(root):
        found = [p for p in fs.glob(root) if not fs.isdir(p)]
    elif fs.isdir(root):
        found = [p for p in fs.find(root) if p.lower().endswith(suffixes)]
    elif fs.exists(root):
        return [path]
    else:
        raise ValueError(f"{path}: no such file or folder")
    if not found:
        raise ValueError(f"{path}: matches no {'/'.join(suffixes)} files")
    return [fs.unstrip_protocol(p) if "://" in path else p for p in sorted(found)]


def expand_shards(shards: list[str]) -> list[str]:
    """Shard list with folders and globs expanded to their `.tar` files (given order, each expansion sorted)."""
    out: list[str] = []
    for shard in shards:
        out.extend(_expand(shard, (".tar",)))
    return out


def _read_shard(url: str) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of one tar shard in file order: (key, {field: bytes}). Raises ShardReadError (a ValueError)
    naming the shard when it is damaged, ShardFormatError when a sample repeats a field."""
    return [(sample["__key__"], {f: v for f, v in sample.items() if not f.startswith("__")})
            for sample in iter_shard_samples(url)]


def _captions(text: bytes, where: str) -> list[str]:
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: caption file is not UTF-8 ({e})") from None
    return [line.strip() for line in decoded.splitlines() if line.strip()]


def load_retrieval_webdataset(shards: list[str]) -> tuple[list[dict], list[str], list[int]]:
    """Image items (`idx`, `bytes`), captions, and the image index of each caption.

    Each sample needs one image field and a `.txt` whose non-empty lines are its captions (several
    lines: several captions of the same image). A sample missing either is an error naming shard and key.
    """
    items: list[dict] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for url in expand_shards(shards):
        for key, fields in _read_shard(url):
            where = f"{url}: sample {key!r}"
            image_field = next((f for f in fields if f in IMAGE_EXTS), None)
            if image_field is None:
                raise ValueError(f"{where} has no image (fields: {sorted(fields)}; expected one of {IMAGE_EXTS})")
            if "txt" not in fields:
                raise ValueError(f"{where} has no .txt caption (fields: {sorted(fields)})")
            lines = _captions(fields["txt"], where)
            if not lines:
                raise ValueError(f"{where}: its .txt holds no non-empty caption line")
            idx = len(items)
            items.append({"idx": idx, "bytes": fields[image_field]})
            captions.extend(lines)
            caption_image.extend([idx] * len(lines))
    if not items:
        raise ValueError(f"shards {shards} hold no samples")
    return items, captions, caption_image


def _stamp(info: dict) -> str:
    keys = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "md5", "generation")
    return json.dumps({k: info[k] for k in keys if info.get(k) is not None}, sort_keys=True, default=str)


# The stamp of an image the table names but storage lacks: the decode step counts and skips it.
_MISSING_STAMP = json.dumps({"missing": True})


def _caption_cell(cell, where: str) -> list[str]:
    """The captions of one table cell: a string, a list of strings (parquet / JSON lists), or a string that
    is a JSON or Python list literal such as `["a dog", "a brown dog"]`."""
    value = cell
    if isinstance(cell, str):
        text = cell.strip()
        value = text
        if text.startswith("[") and text.endswith("]"):
            for parse in (json.loads, ast.literal_eval):
                try:
                    parsed = parse(text)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    continue
                if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
                    value = parsed
                break  # a list of something else, or not a list: the cell is one caption
    if isinstance(value, (list, tuple)):
        captions = [c.strip() if isinstance(c, str) else c for c in value]
        if not captions or any(not isinstance(c, str) or not c for c in captions):
            raise ValueError(f"{where}: caption list {cell!r} must hold non-empty strings")
        return captions
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        raise ValueError(f"{where}: empty caption")
    return [str(value).strip()]


def _image_url(cell, table_fs, table_dir: str, remote: bool, where: str) -> str:
    """An image cell as a URL: absolute paths and URLs as given, other paths relative to the table's folder."""
    if not isinstance(cell, str) or not cell.strip():
        raise ValueError(f"{where}: empty image path")
    path = cell.strip()
    if "://" in path:
        return path
    joined = posixpath.normpath(posixpath.join(table_dir, path))
    return table_fs.unstrip_protocol(joined) if remote and not path.startswith("/") else joined


def _stamps(urls: list[str]) -> dict[str, str]:
    """Size/modification stamps of image files, one listing per folder instead of one request per image."""
    folders: dict[tuple[int, str], tuple[fsspec.AbstractFileSystem, list[tuple[str, str]]]] = {}
    for url in urls:
        fs, path = url_to_fs(url)
        folders.setdefault((id(fs), posixpath.dirname(path)), (fs, []))[1].append((url, path))
    stamps: dict[str, str] = {}
    for (_, folder), (fs, members) in folders.items():
        try:
            listing = {info["name"].rstrip("/"): info for info in fs.ls(folder, detail=True)}
        except (FileNotFoundError, NotADirectoryError):
            listing = {}
        for url, path in members:
            info = listing.get(path)
            stamps[url] = _stamp(info) if info is not None and info.get("type") != "directory" else _MISSING_STAMP
    return stamps


def load_retrieval_table(table: str, image_column: str, caption_column: str,
                         table_format: str = "auto") -> tuple[list[dict], list[str], list[int]]:
    """Image items (`idx`, `path`, `stamp`), captions, and the image index of each caption, from a table.

    Rows naming the same image are one image with several captions: images in order of first
    appearance, each image's captions in row order (as a WebDataset sample's .txt lines are). A missing
    or undecodable image file is left for the decode step to count and skip, as a corrupt sample is.
    """
    from clipforge.eval.table import read_table_rows

    rows = read_table_rows(table, image_column, caption_column, table_format)
    table_fs, table_path = url_to_fs(table)
    remote = "://" in table
    table_dir = posixpath.dirname(table_path)
    captions_of: dict[str, list[str]] = {}
    for row in rows:
        where = f"{table}: {row.where}"
        url = _image_url(row.image, table_fs, table_dir, remote, f"{where}, column `{image_column}`")
        captions_of.setdefault(url, []).extend(_caption_cell(row.caption, f"{where}, column `{caption_column}`"))
    stamps = _stamps(list(captions_of))
    items: list[dict] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for idx, (url, lines) in enumerate(captions_of.items()):
        items.append({"idx": idx, "path": url, "stamp": stamps[url]})
        captions.extend(lines)
        caption_image.extend([idx] * len(lines))
    return items, captions, caption_image


def load_image_folder(folder: str) -> tuple[list[dict], list[int], list[str]]:
    """Items (`idx`, `path`, `stamp`), labels and the sorted class folder names of `folder/<class>/**/<image>`."""
    fs, root = url_to_fs(folder)
    if not fs.isdir(root):
        raise ValueError(f"{folder}: image folder not found")
    class_dirs = sorted(
        (posixpath.basename(p.rstrip("/")), p) for p in fs.ls(root, detail=False) if fs.isdir(p)
    )
    if not class_dirs:
        raise ValueError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image files>)")
    items: list[dict] = []
    labels: list[int] = []
    for label, (name, class_dir) in enumerate(class_dirs):
        found = fs.find(class_dir, detail=True)
        files = sorted(p for p in found if p.lower().rsplit(".", 1)[-1] in IMAGE_EXTS)
        if not files:
            raise ValueError(f"{folder}: class folder {name!r} holds no images ({', '.join(IMAGE_EXTS)})")
        for path in files:
            url = fs.unstrip_protocol(path) if "://" in folder else path
            items.append({"idx": len(items), "path": url, "stamp": _stamp(found[path])})
            labels.append(label)
    return items, labels, [name for name, _ in class_dirs]


def _png(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _first_per_class(labels: list[int], max_per_class: int | None) -> list[int]:
    if max_per_class is None:
        return list(range(len(labels)))
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(labels):
        if taken.get(label, 0) < max_per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return keep


def load_labelled_source(source) -> tuple[list[dict], list[int], list[str] | None]:
    """Items, labels and class names (folder names; None for IDX files) of an ImageFolderSource or IdxSource.

    IDX images are PNG-encoded here (lossless), so they travel through the same decode step as files.
    """
    from clipforge.eval.idx import read_idx_images

    if source.kind == "image_folder":
        items, labels, classnames = load_image_folder(source.path)
    else:
        images, label_array = read_idx_images(source.images, source.labels)
        keep = _first_per_class(label_array.tolist(), source.max_per_class)
        items = [{"idx": n, "bytes": _png(images[i])} for n, i in enumerate(keep)]
        return items, [int(label_array[i]) for i in keep], None
    keep = _first_per_class(labels, source.max_per_class)
    if len(keep) < len(items):
        items = [{**items[i], "idx": n} for n, i in enumerate(keep)]
        labels = [labels[i] for i in keep]
    return items, labels, classnames
