# python -m clipforge.pipeline.karpathy --karpathy dataset_flickr30k.json --images flickr30k-images --out data/flickr30k
#   -> data/flickr30k/{train,val,test}/NNNNN.tar WebDataset shards and data/flickr30k/splits.json (counts)
"""WebDataset shards from a Karpathy-split caption file (Flickr30k, Flickr8k, COCO), for training and retrieval.

Flickr30k and COCO come as an image folder plus Karpathy's `dataset_*.json` (images with `filename`, `split`
and `sentences[].raw`), not as URL lists, so they skip the downloader. The train split gets one sample per
(image, caption) pair, as CLIP fine-tuning on these sets usually does; val and test get one sample per image
whose .txt holds all of its captions, one per line, which is what `task: zeroshot_retrieval` reads (an image→text hit is
any of the image's captions in the top K). Image bytes are copied unchanged; training and evaluation resize.
Shards are written with clipforge.runtime.tar_shard_writer, each under a temporary name until it is complete.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec

from clipforge.pipeline.layout import AtomicFile, OutputLayout
from clipforge.runtime.tar_shard_writer import TarShardWriter

SPLITS = ("train", "val", "test")


class KarpathyFormatError(ValueError):
    """The caption file is not in Karpathy's format."""


@dataclass(frozen=True)
class Entry:
    image: str  # path under the image folder
    split: str
    captions: tuple[str, ...]
    image_id: int


def read_entries(path: str) -> list[Entry]:
    """Images of a Karpathy file; `restval` (COCO) counts as train, as in Karpathy's own training."""
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise KarpathyFormatError(f"{path}: not JSON ({e})") from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise KarpathyFormatError(f"{path}: expected an object with an `images` list (Karpathy's format)")
    entries = []
    for i, img in enumerate(images):
        try:
            split = "train" if img["split"] == "restval" else img["split"]
            name = str(PurePosixPath(img.get("filepath", "")) / img["filename"])
            captions = tuple(" ".join(s["raw"].split()) for s in img["sentences"])
        except (KeyError, TypeError) as e:
            raise KarpathyFormatError(f"{path}: images[{i}] lacks {e} (needs filename, split, sentences[].raw)") from e
        if split not in SPLITS:
            raise KarpathyFormatError(f"{path}: images[{i}].split is {split!r}, expected one of {SPLITS} or restval")
        entries.append(Entry(name, split, captions, int(img.get("imgid", i))))
    return entries


class _Shards:
    """Numbered tar shards of at most `per_shard` samples under `folder`; each appears only once complete."""

    def __init__(self, folder: str, per_shard: int):
        self.layout = OutputLayout(folder)
        self.per_shard = per_shard
        self.index, self.count, self.samples = 0, 0, 0
        self._file: AtomicFile | None = None
        self._tar: TarShardWriter | None = None

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        if self._tar is None or self.count == self.per_shard:
            self.close()
            self._file = self.layout.open_atomic(f"{self.layout.root}/{self.index:05d}.tar")
            self._tar = TarShardWriter(self._file)
            self.index, self.count = self.index + 1, 0
        self._tar.write(key, fields)
        self.count += 1
        self.samples += 1

    def close(self) -> None:
        """Complete the open shard and move it into place."""
        if self._tar is not None and self._file is not None:  # opened together
            self._tar.close()
            self._file.commit()
            self._tar = self._file = None

    def discard(self) -> None:
        """Drop the open shard (its samples were not all written); completed shards stay."""
        if self._file is not None:
            self._file.discard()
            self._tar = self._file = None


def write_shards(karpathy_json: str, image_root: str, out: str, samples_per_shard: int = 1000) -> dict:
    """Write OUT/{train,val,test}/*.tar and OUT/splits.json; returns the sample counts per split."""
    entries = read_entries(karpathy_json)
    fs, _ = fsspec.core.url_to_fs(out)
    counts = {}
    for split in SPLITS:
        chosen = [e for e in entries if e.split == split]
        if not chosen:
            continue
        fs.makedirs(f"{out.rstrip('/')}/{split}", exist_ok=True)
        shards = _Shards(f"{out.rstrip('/')}/{split}", samples_per_shard)
        try:
            for e in chosen:
                try:
                    with fsspec.open(f"{image_root.rstrip('/')}/{e.image}", "rb") as f:
                        image = f.read()
                except FileNotFoundError as err:
                    raise FileNotFoundError(f"{karpathy_json}: image {e.image} of {split} is not under {image_root}") \
                        from err
                ext = PurePosixPath(e.image).suffix.lstrip(".").lower().replace("jpeg", "jpg") or "jpg"
                meta = {"image_id": e.image_id, "filename": e.image, "split": split}
                if split == "train":
                    for j, caption in enumerate(e.captions):
                        shards.add(f"{e.image_id:09d}_{j}", {ext: image, "txt": caption.encode(),
                                                            "json": json.dumps({**meta, "caption_index": j}).encode()})
                else:
                    shards.add(f"{e.image_id:09d}", {ext: image, "txt": "\n".join(e.captions).encode(),
                                                      "json": json.dumps(meta).encode()})
        except BaseException:
            shards.discard()
            raise
        shards.close()
        counts[split] = {"images": len(chosen), "samples": shards.samples, "shards": shards.index}
    with fsspec.open(f"{out.rstrip('/')}/splits.json", "wt") as f:
        json.dump({"source": karpathy_json, "splits": counts}, f, indent=2)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--karpathy", required=True, help="dataset_flickr30k.json (or dataset_coco.json, ...)")
    p.add_argument("--images", required=True, help="folder holding the images (local or any fsspec path)")
    p.add_argument("--out", required=True, help="output folder for the shards (local or any fsspec path)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    args = p.parse_args(argv)
    try:
        counts = write_shards(args.karpathy, args.images, args.out, args.samples_per_shard)
    except (KarpathyFormatError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    for split, c in counts.items():
        print(f"{split}: {c['images']} images, {c['samples']} samples in {c['shards']} shards -> {args.out}/{split}")


if __name__ == "__main__":
    main()
