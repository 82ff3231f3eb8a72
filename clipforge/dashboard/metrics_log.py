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
# An eval key as written by json.dumps (no escapes in metric names).
_EVAL_KEY = re.compile(rb'"(' + re.escape(EVAL_PREFIX.encode()) + rb'[^"\\]+)"\s*:')

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
    return {k[n:]: float(v) for k, v in record.items() if k.startswith(EVAL_PREFIX) and _is_number(v)}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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

    Only the first line, the last complete line and lines holding eval keys are decoded: the runs
    table of thousands of runs must not decode every training step of every run.
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
        whole = complete_part(data)
        if not whole:
            return
        if self.first_line is None:
            self.first_line = next((ln for ln in whole.split(b"\n", 8) if ln.strip()), None)
        best = self.best_evals
        eval_lines = _lines_with(whole, _EVAL_MARK)
        if eval_lines:
            records = _eval_records(eval_lines)
            joined = b"\n".join(eval_lines)
            found = _EVAL_KEY.findall(joined)
            if len(found) == joined.count(_EVAL_MARK):
                # Every eval key was found in the raw bytes: look up only those in the decoded records.
                names = {k.decode("utf-8", "replace") for k in found}
            else:  # escaped characters in a key, or the mark inside a value: look at every key
                names = {k for rec in records for k in rec if k.startswith(EVAL_PREFIX)}
            keys = [(k, k[len(EVAL_PREFIX):], _direction(k[len(EVAL_PREFIX):])) for k in names]
            for rec in records:
                for k, key, direction in keys:
                    v = rec.get(k)
                    if direction and v is not None and _is_number(v):
                        old = best.get(key)
                        if old is None or (v - old) * direction > 0:
                            best[key] = float(v)
        end = len(whole) - 1  # the final newline
        while end > 0:
            start = whole.rfind(b"\n", 0, end) + 1
            rec = parse_line(whole[start:end])
            if rec is not None:
                self.last = rec
                break
            end = start - 1
        self.offset += len(whole)
        self.tail = (self.tail + whole[-_TAIL_CHECK:])[-_TAIL_CHECK:]


def _lines_with(whole: bytes, mark: bytes) -> list[bytes]:
    """The lines of `whole` (complete lines) that contain `mark`, found with bytes searches, not a loop over lines."""
    out = []
    pos = whole.find(mark)
    while pos >= 0:
        start = whole.rfind(b"\n", 0, pos) + 1
        end = whole.find(b"\n", pos)
        out.append(whole[start:end])
        pos = whole.find(mark, end)
    return out


def _eval_records(lines: list[bytes]) -> list[dict]:
    """The valid records among `lines`: decoded as one JSON array when every line is whole (the usual case)."""
    if not lines:
        return []
    try:
        records = json.loads(b"[" + b",".join(lines) + b"]")
    except (ValueError, UnicodeDecodeError):
        records = None
    if records is None or len(records) != len(lines) or not all(isinstance(r, dict) for r in records):
        # Some line is corrupt (or holds more than one value): decide line by line.
        records = [r for r in map(parse_line, lines) if r is not None]
    return records
