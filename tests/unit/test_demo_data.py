"""The offline demo data: Debian packages -> image lists, held-out set, Fashion-MNIST folders, local HTTP."""
from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clipforge.demo.data_openclipart import list_clipart
from clipforge.demo.debian import DEMO_PACKAGES, PackageFetchError, fetch_packages
from clipforge.demo.http_server import serve_directory
from clipforge.demo.offline_data import DemoData, normalize_caption, prepare_demo_data, write_url_list

TINY = dict(max_train=200, heldout=40, fashion_per_class=5)
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]


@pytest.mark.slow
def test_fetch_packages_downloads_once_then_works_offline(data_cache, monkeypatch, tmp_path):
    """First call may download (~350 MB); afterwards no apt-get or dpkg is needed at all."""
    root = fetch_packages(data_cache)
    assert (root / "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").is_file()
    assert (root / "usr/share/unicode/emoji/emoji-test.txt").is_file()
    assert (root / "usr/share/tuxpaint/stamps").is_dir()
    assert (root / "usr/share/openclipart/png").is_dir() and (root / "usr/share/openclipart/svg").is_dir()
    assert (root / "usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file()
    assert all((root / "usr/share/doc" / package / "copyright").is_file() for package in DEMO_PACKAGES)

    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # any apt-get/dpkg call would now fail
    started = time.monotonic()
    assert fetch_packages(data_cache) == root
    assert time.monotonic() - started < 1.0


def test_fetch_without_apt_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PackageFetchError, match="unicode-data.*apt-get"):
        fetch_packages(tmp_path / "cache", packages=("unicode-data",))


@pytest.fixture(scope="module")
def root(data_cache) -> Path:
    return fetch_packages(data_cache)


@pytest.fixture(scope="module")
def tiny(root, data_cache, tmp_path_factory) -> DemoData:
    return prepare_demo_data(data_cache, tmp_path_factory.mktemp("tiny"), **TINY)


def _lists(data: DemoData) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(data.train_list), pd.read_parquet(data.heldout_list)


def test_tiny_prepare_has_every_source_and_the_asked_sizes(tiny):
    train, held = _lists(tiny)
    assert list(train.columns) == ["path", "caption", "source"] == list(held.columns)
    assert len(train) == TINY["max_train"] == tiny.counts["train"]
    assert len(held) == TINY["heldout"] == tiny.counts["heldout"]
    assert set(train["source"]) == {"emoji", "openclipart", "tuxpaint"}
    for source, n in train["source"].value_counts().items():
        assert tiny.counts[f"train_{source}"] == n
    assert set(held["source"]) == {"tuxpaint"}
    assert train["path"].is_unique and not set(train["path"]) & set(held["path"])
    assert (train["caption"].str.strip().str.len() > 0).all()
    # Clothing clip art is always in: the Fashion-MNIST zero-shot task depends on it.
    assert tiny.counts["train_openclipart_clothing"] > 0
    assert train["path"].str.startswith("openclipart/people/clothing/").any()
    assert set(tiny.licenses) >= {"emoji", "openclipart", "tuxpaint", "fashion"}
    assert "OFL" in tiny.licenses["emoji"] and "GPL" in tiny.licenses["tuxpaint"]


def test_heldout_captions_are_unique_and_never_trained_on(tiny):
    train, held = _lists(tiny)
    held_norm = [normalize_caption(c) for c in held["caption"]]
    assert len(set(held_norm)) == len(held_norm)
    assert not set(held_norm) & {normalize_caption(c) for c in train["caption"]}


def test_every_listed_image_exists_opens_and_is_not_blank(tiny):
    train, held = _lists(tiny)
    for rel in pd.concat([train, held])["path"]:
        path = tiny.images_dir / rel
        assert path.is_file(), rel
        assert not Path(rel).is_absolute() and ".." not in Path(rel).parts
        with Image.open(path) as img:
            assert max(img.size) <= 256, rel
            gray = np.asarray(img.convert("L"), dtype=np.float32)
        assert gray.std() > 3 and (gray < 240).mean() > 0.002, f"{rel} is blank"


def test_fashion_folders_are_in_class_order_and_dark_on_white(tiny):
    folders = sorted(p.name for p in tiny.fashion_dir.iterdir() if p.is_dir())
    assert len(folders) == 10
    expected = [name.lower().replace("/", "_").replace(" ", "_") for name in FASHION_CLASSES]
    assert [f.split("_", 1)[1] for f in folders] == expected
    assert [int(f.split("_", 1)[0]) for f in folders] == list(range(10))
    assert len(tiny.fashion_classnames) == 10 and tiny.fashion_classnames[1] == "trouser"
    assert tiny.counts["fashion"] == 10 * TINY["fashion_per_class"]
    for folder in folders:
        files = sorted((tiny.fashion_dir / folder).glob("*.png"))
        assert len(files) == TINY["fashion_per_class"]
        means = []
        for f in files:
            with Image.open(f) as img:
                assert img.size == (112, 112)
                gray = np.asarray(img.convert("L"), dtype=np.float32)
            # Garments are dark on a white background: a white frame around dark ink.
            border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
            assert np.median(border) > 230 and gray.min() < 100, f
            means.append(gray.mean())
        assert np.mean(means) > 140, folder


def test_prepare_is_idempotent_and_cheap_the_second_time(tiny, data_cache):
    stamp = {p: p.stat().st_mtime_ns for p in (tiny.train_list, tiny.heldout_list, tiny.root / "demo_data.json")}
    started = time.monotonic()
    again = prepare_demo_data(data_cache, tiny.root, **TINY)
    assert time.monotonic() - started < 2.0
    assert again == tiny
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_selection_is_deterministic_per_seed(tiny, data_cache, tmp_path):
    same = prepare_demo_data(data_cache, tmp_path / "same", **TINY)
    for a, b in zip(_lists(tiny), _lists(same)):
        pd.testing.assert_frame_equal(a, b)
    other = prepare_demo_data(
        data_cache, tmp_path / "other", max_train=10, heldout=TINY["heldout"], fashion_per_class=1, seed=1
    )
    assert set(_lists(other)[1]["caption"]) != set(_lists(tiny)[1]["caption"])


def test_rebuild_with_other_settings_leaves_no_stale_files(data_cache, tmp_path):
    out = tmp_path / "demo"
    prepare_demo_data(data_cache, out, max_train=60, heldout=10, fashion_per_class=2, seed=3)
    data = prepare_demo_data(data_cache, out, max_train=30, heldout=5, fashion_per_class=1, seed=4)
    train, held = _lists(data)
    listed = set(train["path"]) | set(held["path"])
    on_disk = {p.relative_to(data.images_dir).as_posix() for p in data.images_dir.rglob("*") if p.is_file()}
    assert on_disk == listed and len(train) == 30 and len(held) == 5
    assert len(list(data.fashion_dir.rglob("*.png"))) == 10


def test_prepare_refuses_to_clean_a_folder_it_did_not_write(data_cache, tmp_path):
    foreign = tmp_path / "images" / "holiday.png"
    foreign.parent.mkdir()
    foreign.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not written by prepare_demo_data"):
        prepare_demo_data(data_cache, tmp_path, max_train=5, heldout=1, fashion_per_class=1)
    assert foreign.read_bytes() == b"not ours"


def test_clipart_captions_come_from_titles_and_keywords_not_authors(root):
    clipart, stats = list_clipart(root)
    by_path = {c.relpath: c for c in clipart}
    shirt = by_path["openclipart/people/clothing/t-shirt_01.png"]
    assert shirt.clothing and shirt.caption.startswith("t-shirt")
    # The hat's SVG title was copied from another drawing ("Clipart by ... - baloon1_04").
    hat = by_path["openclipart/people/clothing/hats/hat_01.png"]
    assert "baloon" not in hat.caption and hat.caption.startswith("hat")
    captions = " ".join(c.caption for c in clipart).lower()
    assert "open clip art library" not in captions and "nicu buculei" not in captions
    assert not re.search(r"\b(collection|unsorted|clip ?art by)\b", captions)
    assert stats["openclipart_duplicates"] > 0 and len(clipart) > 2000


def test_normalize_caption():
    assert normalize_caption("  A  Flower. ") == "a flower"
    assert normalize_caption("“Sacagawea” dollar!") == "sacagawea” dollar"
    assert normalize_caption("– Because a brain…") == "because a brain"
    assert normalize_caption("flag: Germany") == "flag: germany"


def _serve_fixture(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    root = tmp_path / "www"
    (root / "sub dir").mkdir(parents=True)
    payload = os.urandom(70_000)
    (root / "sub dir" / "a+b.bin").write_bytes(payload)
    secret = b"outside the served root"
    (tmp_path / "secret.txt").write_bytes(secret)
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    return root, payload, secret


def _raw_get(base: str, path: str) -> tuple[int, bytes]:
    """Send the path exactly as given (urllib would normalise `..` away)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_serve_directory_serves_files_and_nothing_else(tmp_path):
    root, payload, secret = _serve_fixture(tmp_path)
    with serve_directory(root) as base:
        assert base.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{base}/sub%20dir/a%2Bb.bin", timeout=10) as resp:
            assert resp.status == 200 and resp.read() == payload
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/sub%20dir/nope.bin", timeout=10)
        assert missing.value.code == 404
        outside = ("/../secret.txt", "/sub%20dir/../../secret.txt", "/%2e%2e/secret.txt", "/link.txt")
        for path in outside + ("/", "/sub%20dir/"):
            status, body = _raw_get(base, path)
            assert status == 404 and secret not in body, path
    with pytest.raises(OSError):
        _raw_get(base, "/sub%20dir/a%2Bb.bin")


def test_serve_directory_rejects_a_missing_root(tmp_path):
    with pytest.raises(NotADirectoryError, match="nowhere"):
        with serve_directory(tmp_path / "nowhere"):
            pass


def test_write_url_list_urls_download_the_listed_images(tiny, tmp_path):
    with serve_directory(tiny.images_dir) as base:
        for listed in (tiny.train_list, tiny.heldout_list):
            urls = pd.read_parquet(write_url_list(listed, base + "/", tmp_path / f"{listed.stem}_urls.parquet"))
            paths = pd.read_parquet(listed)
            assert list(urls.columns) == ["url", "caption", "source"] and len(urls) == len(paths)
            assert (urls["caption"] == paths["caption"]).all() and (urls["source"] == paths["source"]).all()
            for url, rel in zip(urls["url"], paths["path"]):
                assert url.startswith(base + "/") and "//" not in url.removeprefix("http://")
                with urllib.request.urlopen(url, timeout=10) as resp:
                    assert resp.read() == (tiny.images_dir / rel).read_bytes(), url


def test_write_url_list_names_missing_columns(tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"path": ["x.png"]}).to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad\.parquet.*caption"):
        write_url_list(bad, "http://127.0.0.1:1", tmp_path / "out.parquet")
