"""Reading metrics.jsonl while the trainer may be writing it.

Offsets are byte offsets just past a newline: only complete lines are consumed, so a half-written
last line is read again on the next poll, once it is whole. Lines that are not a JSON object are
skipped and counted (a crash mid-write, a disk hiccup), never fatal.

Eval results logged during training use keys `eval/<dataset>/<metric>`; they are reported as
`<dataset>/<metric>`.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field

EVAL_PREFIX = "eval/"
_EVAL_MARK = b'"' + EVAL_PREFIX.encode()

# Bytes before an offset remembered to notice that the file was rewritten (a resumed run drops the
# lines logged after its checkpoint and starts the file again).
_TAIL_CHECK = 64


def parse_line(line: bytes) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def complete_part(data: bytes) -> bytes:
    """The prefix of `data` made of whole lines (up to and including the last newline)."""
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else b""


@dataclass
class Chunk:
    records: list[dict]
    offset: int  # where the next read starts
    skipped: int  # complete lines that were not JSON objects


def parse_records(data: bytes, offset: int) -> Chunk:
    """Every record in the complete lines of `data`, which starts at byte `offset` of the file."""
    whole = complete_part(data)
    records, skipped = [], 0
    for line in whole.split(b"\n"):
        if not line.strip():
            continue
        rec = parse_line(line)
        if rec is None:
            skipped += 1
        else:
            records.append(rec)
    return Chunk(records, offset + len(whole), skipped)


def eval_metrics(record: dict) -> dict[str, float]:
    """`<dataset>/<metric>` -> value for the eval keys of one record (finite numbers only)."""
    n = len(EVAL_PREFIX)
    return {k[n:]: float(v) for k, v in record.items() if k.startswith(EVAL_PREFIX) and is_finite_number(v)}


def is_finite_number(v) -> bool:
    """An int or float (not a bool) that is finite; integers too large for a float are not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def lower_is_better(metric_key: str) -> bool:
    name = metric_key.rsplit("/", 1)[-1].lower()
    return "loss" in name or "error" in name or name.endswith("_err")


@functools.lru_cache(maxsize=4096)
def _direction(metric_key: str) -> int:
    """+1 if higher is better, -1 if lower is better, 0 for sample counts (`n_...`), which are not scores."""
    if metric_key.rsplit("/", 1)[-1].startswith("n_"):
        return 0
    return -1 if lower_is_better(metric_key) else 1


def merge_best(best: dict[str, float], new: dict[str, float]) -> None:
    for k, v in new.items():
        direction = _direction(k)
        if direction:
            old = best.get(k)
            if old is None or (v - old) * direction > 0:
                best[k] = v


@dataclass
class MetricsDigest:
    """What the runs table needs from a metrics log, updated incrementally as the file grows.

    Only the first line, the last complete line and the eval values are looked at: the runs table of
    thousands of runs must not decode every training step of every run. Eval values are read off the
    raw bytes; of each metric's best value only the line it comes from is decoded, to check that it is
    a JSON object holding that value (see `_best_of_eval_values`).
    """

    offset: int = 0
    tail: bytes = b""
    first_line: bytes | None = None  # decoded only when asked for (wall time of runs without a summary)
    last: dict | None = None
    best_evals: dict[str, float] = field(default_factory=dict)

    @property
    def first(self) -> dict | None:
        return parse_line(self.first_line) if self.first_line is not None else None

    def resume_start(self) -> int:
        """Where to read from to continue: a few bytes before our offset, to check they did not change."""
        return self.offset - len(self.tail)

    def continue_with(self, data: bytes) -> bool:
        """Feed `data` read from `resume_start()`; False (nothing consumed) if the file was rewritten."""
        if data[: len(self.tail)] != self.tail:
            return False
        self.feed(data[len(self.tail):])
        return True

    def feed(self, data: bytes) -> None:
        """Consume the complete lines of `data`, which starts at `self.offset`."""
        end = data.rfind(b"\n") + 1
        if not end:
            return
        whole = data if end == len(data) else data[:end]
        if self.first_line is None:
            self.first_line = _first_line(whole)
        decoded: dict[int, dict | None] = {}  # line start -> record, for lines decoded here
        stop = end - 1  # the final newline
        while stop > 0:
            start = whole.rfind(b"\n", 0, stop) + 1
            rec = decoded[start] = parse_line(whole[start:stop])
            if rec is not None:
                self.last = rec
                break
            stop = start - 1
        first_mark = whole.find(_EVAL_MARK)
        if first_mark >= 0:
            found = _best_of_eval_values(whole, first_mark, decoded)
            if found is None:
                found = _eval_values_line_by_line(whole)
            merge_best(self.best_evals, found)
        self.offset += end
        self.tail = (self.tail + whole[-_TAIL_CHECK:])[-_TAIL_CHECK:]


_JSON_NUMBER = rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
# An eval key as json.dumps writes it when it holds no escapes or non-ASCII characters, and a number
# (json.dumps writes NaN and infinities as below: an undefined metric, such as acc5 with 3 classes).
_EVAL_NUMBER = re.compile(_EVAL_MARK + rb'([\x20\x21\x23-\x5b\x5d-\x7e]+)"[ \t\r]*:[ \t\r]*('
                          + _JSON_NUMBER + rb"|NaN|-?Infinity)")
# Eval key as written (bytes) -> (`<dataset>/<metric>`, direction); a handful of distinct keys per folder.
_KEYS: dict[bytes, tuple[str, int]] = {}


def _key_info(raw: bytes) -> tuple[str, int]:
    info = _KEYS.get(raw)
    if info is None:
        key = raw.decode("ascii")
        info = (key, _direction(key))
        if len(_KEYS) < 4096:
            _KEYS[raw] = info
    return info


def _best_of_eval_values(whole: bytes, pos: int, decoded: dict[int, dict | None]) -> dict[str, float] | None:
    """`<dataset>/<metric>` -> its best value in the complete lines `whole`, whose first `"eval/` is at
    `pos`, or None when only decoding every eval line can tell. `decoded` holds lines already decoded
    (by their start) and gets the ones decoded here.

    When every `"eval/` in the bytes starts a `"eval/KEY": NUMBER` match, the matches include every
    numeric eval value of every line that is a JSON object (and maybe more: values in lines that are
    not JSON objects, nested deeper, or given twice). So when the line of a metric's best match is a
    JSON object holding that value, it is the metric's best value, and only that line is decoded.
    """
    best: dict[str, tuple[float, int]] = {}
    while pos >= 0:
        m = _EVAL_NUMBER.match(whole, pos)
        if m is None:
            return None  # an eval key with escapes or non-ASCII characters, or a value that is not a number
        raw, number = m.groups()
        key, direction = _key_info(raw)
        if direction:
            v = float(number)
            old = best.get(key)
            if (old is None or (v - old[0]) * direction > 0) and math.isfinite(v):
                best[key] = (v, pos)
        pos = whole.find(_EVAL_MARK, m.end())
    for key, (v, pos) in best.items():
        start = whole.rfind(b"\n", 0, pos) + 1
        if start not in decoded:
            decoded[start] = parse_line(whole[start:whole.find(b"\n", pos)])
        rec = decoded[start]
        held = None if rec is None else rec.get(EVAL_PREFIX + key)
        if not is_finite_number(held) or held != v:
            return None
    return {key: v for key, (v, _) in best.items()}


def _eval_values_line_by_line(whole: bytes) -> dict[str, float]:
    """Best eval values of the lines of `whole` that are JSON objects, decoding every line with an eval key."""
    best: dict[str, float] = {}
    pos = whole.find(_EVAL_MARK)
    while pos >= 0:
        start = whole.rfind(b"\n", 0, pos) + 1
        stop = whole.find(b"\n", pos)
        rec = parse_line(whole[start:stop])
        if rec is not None:
            merge_best(best, eval_metrics(rec))
        pos = whole.find(_EVAL_MARK, stop)
    return best


def _first_line(whole: bytes) -> bytes | None:
    start = 0
    while start < len(whole):
        stop = whole.find(b"\n", start)
        if whole[start:stop].strip():
            return whole[start:stop]
        start = stop + 1
    return None
