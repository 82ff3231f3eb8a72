"""The shard reader and writer every part of clipforge uses (clipforge.runtime.tar_shard_reader/_writer).

Writing: the bytes of webdataset's TarWriter (USTAR), read back by webdataset itself. Reading: webdataset's
key grouping over clipforge's own tar expansion, which finds a shard cut anywhere (webdataset's own expansion
does not, see below), and counts exactly the samples a read yields for every cut of a shard. Neither imports
webdataset (which imports torch); webdataset is the reference these tests compare with.
"""
from __future__ import annotations

import gzip
import io
import logging
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
import webdataset.tariterators

from clipforge.runtime.tar_shard_reader import (
    ShardFormatError,
    ShardReadError,
    count_shard_samples,
    iter_shard_samples,
    samples_in,
    split_member_name,
)
from clipforge.runtime.tar_shard_writer import TarShardWriter


def _fields(i: int) -> dict[str, bytes]:
    # Sizes vary so that members end at different offsets within their 512-byte blocks.
    return {"jpg": bytes([i % 251]) * (300 + 97 * i), "txt": f"caption {i}".encode(), "json": b'{"i": %d}' % i}


def _write(path: Path, n: int, mtime: float = 1_700_000_000.5) -> Path:
    with open(path, "wb") as f, TarShardWriter(f, mtime=mtime) as tar:
        for i in range(n):
            tar.write(f"{i:06d}", _fields(i))
    return path


def _complete(sample: dict) -> bool:
    return "jpg" in sample and "txt" in sample


def _read(url: str, fields=None) -> tuple[list[dict], list[Exception]]:
    errors: list[Exception] = []
    samples = list(iter_shard_samples(url, fields, handler=lambda e: errors.append(e) or True))
    return samples, errors


def _count(url: str, fields=None) -> int:
    return count_shard_samples(url, _complete, fields, handler=lambda e: True)


# ---------------------------------------------------------------- writing


def test_written_shards_are_ustar_in_webdatasets_member_order_and_read_back_by_webdataset(tmp_path):
    shard = _write(tmp_path / "a.tar", 3)
    raw = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"{i:06d}.{ext}" for i in range(3) for ext in ("jpg", "json", "txt")]
    assert {(m.mode, m.uname, m.gname, m.mtime, m.type) for m in members} == {(0o444, "bigdata", "bigdata",
                                                                               1_700_000_000, tarfile.REGTYPE)}
    # USTAR: every header carries the POSIX magic and no member needs a pax header (typeflag x).
    assert all(raw[m.offset + 257 : m.offset + 265] == b"ustar\x0000" for m in members)
    assert b"PaxHeader" not in raw
    got = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == ["000000", "000001", "000002"]
    assert all({k: s[k] for k in ("jpg", "txt", "json")} == _fields(i) for i, s in enumerate(got))


def test_written_bytes_equal_webdatasets_tar_writer():
    ours, theirs = io.BytesIO(), io.BytesIO()
    reference = wds.TarWriter(theirs, encoder=False, mtime=1_700_000_000)
    reference.tarstream.format = tarfile.USTAR_FORMAT  # TarWriter does not pass its `format` on (0.2.86 to 0.3.x)
    with TarShardWriter(ours, mtime=1_700_000_000.5) as tar:
        for i in range(7):
            fields = {**_fields(i), "_private": b"not written", "cls": b"%d" % i}
            tar.write(f"dir/{i:06d}", fields)
            reference.write({"__key__": f"dir/{i:06d}", **fields})
    reference.close()
    assert ours.getvalue() == theirs.getvalue()


def test_builder_and_readers_do_not_import_torch(tmp_path):
    """`import webdataset` imports torch (+480 MiB in the build's driver): the shard code and the builder's
    modules must get by without either."""
    code = (f"import sys, clipforge.pipeline.build, clipforge.pipeline.rewrite\n"
            f"from clipforge.runtime.tar_shard_writer import TarShardWriter\n"
            f"from clipforge.runtime.tar_shard_reader import iter_shard_samples\n"
            f"with open({str(tmp_path / 'a.tar')!r}, 'wb') as f, TarShardWriter(f) as tar:\n"
            f"    tar.write('k', {{'txt': b'x'}})\n"
            f"assert [s['txt'] for s in iter_shard_samples({str(tmp_path / 'a.tar')!r})] == [b'x']\n"
            f"print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_writer_leaves_the_stream_open_and_refuses_fields_that_are_not_bytes():
    stream = io.BytesIO()
    with TarShardWriter(stream) as tar:
        tar.write("k", {"txt": b"x"})
        with pytest.raises(ValueError, match="txt doesn't map to a bytes"):
            tar.write("k2", {"jpg": b"image", "txt": "text"})
    assert not stream.closed and tar.samples == 1
    assert [s["__key__"] for s in samples_in(io.BytesIO(stream.getvalue()), "mem.tar")] == ["k"]


# ---------------------------------------------------------------- reading


def test_samples_come_in_tar_order_with_their_fields(tmp_path):
    shard = _write(tmp_path / "a.tar", 5)
    samples, errors = _read(str(shard))
    assert errors == []
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(5)]
    assert all(s["__url__"] == str(shard) for s in samples)
    assert [{k: v for k, v in s.items() if not k.startswith("__")} for s in samples] == [_fields(i) for i in range(5)]
    only = _read(str(shard), fields={"txt"})[0]
    assert [set(s) - {"__key__", "__url__"} for s in only] == [{"txt"}] * 5
    assert [s["txt"] for s in iter_shard_samples(str(shard), with_data=False)] == [b""] * 5


def test_grouping_equals_webdatasets_group_by_keys_on_any_member_order():
    rng = random.Random(3)
    names = [f"{k}.{f}" for k in ("a", "b", "c", "d/e") for f in ("jpg", "txt", "JSON")] + ["noext", ".hidden.txt"]
    for _ in range(200):
        members = [{"fname": rng.choice(names), "data": bytes([rng.randrange(256)]), "__url__": "s.tar"}
                   for _ in range(rng.randrange(12))]
        for i in sorted(rng.sample(range(len(members) + 1), k=rng.randrange(2)), reverse=True):
            members.insert(i, {})  # an end marker, as the expansion gives before damage
        for go_on in (True, False):
            ours: list = []
            theirs: list = []
            got = list(samples_in_members(members, ours, go_on))
            expected = list(webdataset.tariterators.group_by_keys(
                iter(members), keys=split_member_name, handler=lambda e, seen=theirs: seen.append(e) or go_on))
            assert got == expected and len(ours) == len(theirs), members


def samples_in_members(members: list, errors: list, go_on: bool):
    from clipforge.runtime.tar_shard_reader import _group_by_keys

    return _group_by_keys(iter(members), "s.tar", lambda e: errors.append(e) or go_on)


def test_member_names_split_into_key_and_field():
    assert split_member_name("a/b/000123.TXT.gz") == ("a/b/000123", "txt.gz")
    assert split_member_name("dir.v2/x.jpg") == ("dir.v2/x", "jpg")
    for name in ("noext", "dir/.hidden.txt", "trailing.", ".jpg"):
        assert split_member_name(name) == (None, None), name


@pytest.mark.parametrize("fields", [None, {"jpg", "txt"}], ids=["all-members", "jpg-and-txt"])
def test_a_count_equals_what_a_read_yields_for_every_cut_and_every_cut_is_found(tmp_path, fields):
    """Exact resume rests on this: cut a shard at every block and at odd offsets; the headers-only count and
    the read agree, and every cut before the end-of-archive marker is reported as damage."""
    whole = _write(tmp_path / "whole.tar", 6).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        end = max(m.offset_data + m.size for m in tar.getmembers())
    marker = -(-end // 512) * 512  # where the end-of-archive marker starts
    cuts = sorted(set(range(0, len(whole), 512)) | set(range(1, marker, 397)))
    for cut in cuts:
        part = tmp_path / "part.tar"
        part.write_bytes(whole[:cut])
        samples, errors = _read(str(part), fields)
        complete = [s["__key__"] for s in samples if _complete(s)]
        assert _count(str(part), fields) == len(complete), cut
        assert complete == [f"{i:06d}" for i in range(len(complete))], cut
        damaged = cut < marker + 512
        assert [type(e) for e in errors] == ([ShardReadError] if damaged else []), cut
        if damaged:
            assert errors[0].url == str(part) and "not a readable tar shard" in str(errors[0]), cut
    assert _count(str(tmp_path / "whole.tar"), fields) == 6


def test_a_damaged_header_ends_the_shard_there_and_the_samples_before_it_are_kept(tmp_path):
    shard = _write(tmp_path / "a.tar", 6)
    with tarfile.open(shard) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("000003")][0].offset
    raw = bytearray(shard.read_bytes())
    raw[third + 148 : third + 156] = b"9999999\x00"  # a header checksum that does not match
    shard.write_bytes(bytes(raw))
    samples, errors = _read(str(shard))
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000002"] and _count(str(shard)) == 3
    assert len(errors) == 1 and "after member `000002.txt`: a member header cannot be read" in str(errors[0])


def test_files_that_are_not_shards_are_one_line_errors_naming_them(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    (tmp_path / "empty.tar").write_bytes(b"")
    for name, problem in (("junk.tar", "not a tar archive"), ("empty.tar", "not a tar archive (empty file)"),
                          ("missing.tar", "it does not exist")):
        url = str(tmp_path / name)
        with pytest.raises(ShardReadError) as caught:
            list(iter_shard_samples(url))
        message = str(caught.value)
        assert message.startswith(f"{url}: not a readable tar shard: ") and problem in message, message
        assert "\n" not in message
        assert _count(url) == 0


def test_a_handler_that_stops_or_goes_on_ends_a_damaged_shard_either_way(tmp_path):
    whole = _write(tmp_path / "whole.tar", 4).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    for verdict in (True, False):
        seen: list[Exception] = []
        keys = [s["__key__"] for s in iter_shard_samples(str(cut), handler=lambda e: seen.append(e) or verdict)]
        assert 0 < len(keys) < 4 and [type(e) for e in seen] == [ShardReadError]


def test_a_field_repeated_within_a_sample_is_an_error_naming_shard_and_member(tmp_path):
    shard = tmp_path / "dup.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("a.jpg", b"1"), ("a.txt", b"first"), ("a.txt", b"second"), ("b.jpg", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardFormatError, match=rf"^{shard}: member `a\.txt` repeats a field its sample already has"):
        list(iter_shard_samples(str(shard)))
    samples, errors = _read(str(shard))
    assert [(s["__key__"], s.get("txt")) for s in samples] == [("a", b"first"), ("b", None)]
    assert [type(e) for e in errors] == [ShardFormatError]


def test_compressed_and_unseekable_shards_read_like_plain_ones(tmp_path):
    shard = _write(tmp_path / "a.tar", 4)
    expected = _read(str(shard))[0]
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    assert [s["__key__"] for s in _read(str(gz))[0]] == [s["__key__"] for s in expected] and _count(str(gz)) == 4

    class Unseekable(io.RawIOBase):
        def __init__(self, data: bytes):
            self._inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            return self._inner.readinto(buffer)

    streamed = list(samples_in(Unseekable(shard.read_bytes()), str(shard)))
    assert streamed == expected


def test_webdatasets_own_expansion_misses_a_cut_at_a_header(tmp_path):
    """Why clipforge expands tars itself: webdataset's tar_file_iterator reads a shard cut exactly at a member
    header as a complete shard (tarfile ends such a stream silently), so its samples and a resume plan would
    silently shrink. If this test fails, webdataset has learned to see such cuts."""
    whole = _write(tmp_path / "whole.tar", 4)
    with tarfile.open(whole) as tar:
        header = [m for m in tar.getmembers() if m.name == "000002.jpg"][0].offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:header])
    with open(cut, "rb") as f:
        names = [m["fname"] for m in webdataset.tariterators.tar_file_iterator(f)]  # no error raised
    assert names[-1] == "000001.txt"
    samples, errors = _read(str(cut))
    assert [s["__key__"] for s in samples] == ["000000", "000001"]
    assert len(errors) == 1 and "ends without the end-of-archive marker" in str(errors[0])


def test_train_and_eval_read_through_the_same_reader(tmp_path, caplog):
    from clipforge.eval.datasets import load_retrieval_webdataset
    from clipforge.train.shards import ReadStats, SampleKeys, count_samples, iter_raw_samples

    whole = _write(tmp_path / "whole.tar", 5).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    keys = SampleKeys.parse("jpg", "txt")
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        raw = list(iter_raw_samples(str(cut), keys, stats))
    assert len(raw) == count_samples(str(cut), keys) and stats.broken_shards == [str(cut)]
    assert f"{cut}: not a readable tar shard after member" in caplog.text
    with pytest.raises(ValueError, match=rf"^{cut}: not a readable tar shard after member `\d+\.\w+`: "):
        load_retrieval_webdataset([str(cut)])
