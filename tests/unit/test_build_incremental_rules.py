"""The rules behind re-running a build and failing it: which failures are retried, when too few rows succeeded,
how a patched shard's tables are merged, and when sizes.json is (re)written. No Ray, no network."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from clipforge.errors import SpecError
from clipforge.pipeline import status as st
from clipforge.pipeline.build import _require_successes
from clipforge.pipeline.errors import TooFewSuccessesError
from clipforge.pipeline.incremental import restored_codes
from clipforge.pipeline.layout import OutputLayout
from clipforge.pipeline.shard_patch import merged
from clipforge.pipeline.spec import BuildSpec, FilterSpec


def spec(tmp_path, **top) -> BuildSpec:
    return BuildSpec.model_validate({"kind": "build", "name": "b", "input": {"path": str(tmp_path / "in.csv")},
                                     "output": {"path": str(tmp_path / "out")}, **top})


@pytest.mark.parametrize("code", ["timeout", "connection_error", "skipped_straggler", "http_429", "http_500",
                                  "http_503", "http_599"])
def test_transient_codes(code):
    assert st.is_transient(code)


@pytest.mark.parametrize("code", ["ok", "http_404", "http_410", "http_400", "http_5000", "http_5xx", "not_an_image",
                                  "too_large", "duplicate", "near_duplicate", "filtered_clip_score", "opted_out",
                                  "private_address", "invalid_url", "caption_too_short", "too_many_redirects"])
def test_permanent_codes(code):
    assert not st.is_transient(code)


def test_incremental_and_min_success_fraction_are_validated(tmp_path):
    assert spec(tmp_path).incremental == "skip" and spec(tmp_path).min_success_fraction is None
    for bad in ({"incremental": "retry"}, {"min_success_fraction": 1.5}, {"min_success_fraction": -0.1}):
        with pytest.raises((SpecError, ValueError)):
            spec(tmp_path, **bad)


def stats(ok: int, **failed: int) -> dict:
    counts = {"ok": ok, **failed}
    ordered = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return {"total": sum(counts.values()), "ok": ok, "status_counts": ordered}


@pytest.mark.parametrize("wanted, ok, failed, passes", [
    (None, 1, 999, True),    # default: one row is enough
    (None, 0, 5, False),     # ...and none is not
    (0.3, 3, 7, True),       # exactly the fraction (3 / 10 is 0.3; 0.3 * 10 is not 3 in floating point)
    (0.3, 2, 8, False),
    (1.0, 10, 0, True),
    (0.0, 0, 5, True),       # 0: never fail for failed rows
    (0.5, 0, 0, False),      # an empty input: nothing succeeded
])
def test_success_rule(tmp_path, wanted, ok, failed, passes):
    s = spec(tmp_path, min_success_fraction=wanted)
    if passes:
        _require_successes(s, stats(ok, http_404=failed))
    else:
        with pytest.raises(TooFewSuccessesError):
            _require_successes(s, stats(ok, http_404=failed))


def test_too_few_successes_is_one_line_naming_fraction_reasons_manifest_and_command(tmp_path):
    s = spec(tmp_path, min_success_fraction=0.9)
    with pytest.raises(TooFewSuccessesError) as info:
        _require_successes(s, stats(1, http_404=5, timeout=3, http_503=2, not_an_image=1))
    message = str(info.value)
    out = str(tmp_path / "out")
    assert "\n" not in message
    assert "ok fraction 0.0833 (1 of 12 rows)" in message and "min_success_fraction 0.9" in message
    assert "http_404 5, timeout 3, http_503 2 and 1 more reason;" in message
    assert f"{out}/manifest/" in message and f"`clipforge manifest failures {out}`" in message


def test_filters_whose_drops_a_retry_brings_back():
    assert restored_codes(FilterSpec(dedup_exact=True)) == set()
    assert restored_codes(FilterSpec(near_dup_max_distance=4)) == {st.NEAR_DUPLICATE}


def test_a_patch_replaces_the_redone_rows_and_keeps_the_rest_in_row_order():
    old = pa.table({"row": pa.array([3, 4, 5], pa.int64()), "status": ["ok", "timeout", "http_500"],
                    "extra": pa.array([1, 2, 3], pa.int64())})
    new = pa.table({"row": pa.array([5, 4], pa.int64()), "status": ["ok", "ok"], "extra": pa.array([None, None])})
    got = merged(old, new, {4, 5})
    assert got.schema == old.schema
    assert got.to_pylist() == [{"row": 3, "status": "ok", "extra": 1}, {"row": 4, "status": "ok", "extra": None},
                               {"row": 5, "status": "ok", "extra": None}]
    # Columns that changed since (another input.extra_cols): joined by name, the gaps null.
    other = pa.table({"row": pa.array([4], pa.int64()), "status": ["ok"], "source": ["s"]})
    joined = merged(old, other, {4})
    assert joined.column_names == ["row", "status", "extra", "source"]
    assert joined.to_pylist()[1] == {"row": 4, "status": "ok", "extra": None, "source": "s"}


def test_sizes_json_names_each_tar_and_is_rewritten_only_when_it_changes(tmp_path):
    layout = OutputLayout(str(tmp_path))
    layout.write_sizes({1: 7, 0: 3})
    path = tmp_path / "sizes.json"
    assert json.loads(path.read_text()) == {"00000.tar": 3, "00001.tar": 7}
    assert list(json.loads(path.read_text())) == ["00000.tar", "00001.tar"]
    written = path.stat().st_mtime_ns
    layout.write_sizes({0: 3, 1: 7})
    assert path.stat().st_mtime_ns == written
    layout.write_sizes({0: 2, 1: 7})
    assert json.loads(path.read_text()) == {"00000.tar": 2, "00001.tar": 7}
    path.write_text("not json")
    layout.write_sizes({0: 2})
    assert json.loads(path.read_text()) == {"00000.tar": 2}
    assert not list(tmp_path.glob(".*.tmp-*"))
