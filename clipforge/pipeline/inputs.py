"""Reading URL lists: parquet / csv / tsv / jsonl (text formats optionally compressed), one file, a folder
or a glob, local or fsspec. Rows are streamed in batches, so a list far larger than memory can be built.

Every configured column is checked in every file before any download starts, so a typo fails fast
with the file and column named. Rows get a global index in file order (files sorted by name).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clipforge.pipeline.errors import BuildInputError
from clipforge.pipeline.sample import InputRow
from clipforge.pipeline.shard_task import ShardJob
from clipforge.pipeline.spec import InputSpec

log = logging.getLogger(__name__)

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
            ".ndjson": "jsonl", ".json": "jsonl"}
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_GLOB_CHARS = set("*?[")
_READ_ERRORS = (OSError, EOFError, ValueError, pa.ArrowException, UnicodeDecodeError, gzip.BadGzipFile)


@dataclass(frozen=True)
class InputFile:
    path: str  # as the filesystem names it
    shown: str  # as the user would write it, for messages
    format: str
    compression: str | None


def _split_ext(path: str) -> tuple[str, str | None]:
    """(format extension, compression) of a file name: `a.tsv.gz` -> (`.tsv`, `gzip`)."""
    name = path.rsplit("/", 1)[-1].lower()
    compression = None
    for ext, comp in _COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
            break
    dot = name.rfind(".")
    return (name[dot:] if dot >= 0 else ""), compression


class UrlList:
    """The input files of a build and a streaming reader over their rows."""

    def __init__(self, spec: InputSpec, batch_rows: int = 8192):
        self.spec = spec
        self.batch_rows = batch_rows
        try:
            self.fs, base = fsspec.core.url_to_fs(spec.path, **spec.storage_options)
        except (TypeError, ValueError, ImportError) as e:
            raise BuildInputError(f"input.path `{spec.path}` / input.storage_options: {e}") from None
        self.files = self._discover(base)
        self.columns = [spec.url_col] + ([spec.caption_col] if spec.caption_col else []) + list(spec.extra_cols)
        for f in self.files:
            self._check_columns(f)
        self.malformed_lines = 0

    # -- discovery --------------------------------------------------------------------------

    def _shown(self, path: str) -> str:
        return self.fs.unstrip_protocol(path) if "://" in self.spec.path else path

    def _input_file(self, path: str, explicit: bool) -> InputFile | None:
        ext, compression = _split_ext(path)
        fmt = self.spec.format if self.spec.format != "auto" else _FORMATS.get(ext)
        if fmt is None:
            if explicit:
                raise BuildInputError(
                    f"{self._shown(path)}: cannot tell the format from the extension `{ext or '(none)'}`; "
                    "set input.format to parquet, csv, tsv or jsonl"
                )
            return None
        if fmt == "parquet" and compression:
            raise BuildInputError(f"{self._shown(path)}: parquet files cannot be {compression}-compressed")
        return InputFile(path, self._shown(path), fmt, compression)

    def _discover(self, base: str) -> list[InputFile]:
        where = self.spec.path
        if any(c in base for c in _GLOB_CHARS):
            paths = sorted(p for p in self.fs.glob(base) if not self.fs.isdir(p))
            if not paths:
                raise BuildInputError(f"input.path: glob `{where}` matches no files")
            files = [self._input_file(p, explicit=True) for p in paths]
        elif self.fs.isdir(base):
            paths = sorted(
                p for p in self.fs.find(base)
                if not p.rsplit("/", 1)[-1].startswith((".", "_"))
            )
            files = [f for f in (self._input_file(p, explicit=False) for p in paths) if f is not None]
            if not files:
                raise BuildInputError(f"input.path: folder `{where}` holds no parquet/csv/tsv/jsonl files")
        elif self.fs.exists(base):
            files = [self._input_file(base, explicit=True)]
        else:
            raise BuildInputError(f"input.path: `{where}` does not exist")
        return [f for f in files if f is not None]

    def _open(self, f: InputFile):
        return self.fs.open(f.path, "rb", compression=f.compression)

    # -- column checks ----------------------------------------------------------------------

    def _missing(self, f: InputFile, available: list[str]) -> None:
        roles = {self.spec.url_col: "input.url_col"}
        if self.spec.caption_col:
            roles.setdefault(self.spec.caption_col, "input.caption_col")
        for col in self.spec.extra_cols:
            roles.setdefault(col, "input.extra_cols")
        for col in self.columns:
            if col not in available:
                shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
                raise BuildInputError(f"{f.shown}: column `{col}` ({roles[col]}) not found; the file has: {shown}")

    def _check_columns(self, f: InputFile) -> None:
        try:
            if f.format == "parquet":
                with self._open(f) as fh:
                    names = pq.ParquetFile(fh).schema_arrow.names
            elif f.format in ("csv", "tsv"):
                names = self._header(f)
            else:
                names = self._first_record_keys(f)
        except BuildInputError:
            raise
        except _READ_ERRORS as e:
            raise BuildInputError(f"{f.shown}: cannot read as {f.format}: {e}") from None
        self._missing(f, names)

    def _header(self, f: InputFile) -> list[str]:
        with self._open(f) as fh:
            line = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="").readline()
        if not line.strip():
            raise BuildInputError(f"{f.shown}: empty file (a header line with column names is required)")
        if f.format == "tsv":
            return [c.strip() for c in line.rstrip("\r\n").split("\t")]
        return [c.strip() for c in next(csv.reader([line]))]

    def _first_record_keys(self, f: InputFile) -> list[str]:
        with self._open(f) as fh:
            for lineno, line in enumerate(io.TextIOWrapper(fh, encoding="utf-8-sig"), 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BuildInputError(f"{f.shown}: line {lineno} is not JSON: {e}") from None
                    if not isinstance(record, dict):
                        raise BuildInputError(f"{f.shown}: line {lineno} is not a JSON object")
                    return list(record)
        raise BuildInputError(f"{f.shown}: empty file")

    # -- reading ----------------------------------------------------------------------------

    def count_rows(self) -> int | None:
        """Total rows when cheap to know (parquet footers only); None for text formats."""
        if any(f.format != "parquet" for f in self.files):
            return None
        total = 0
        for f in self.files:
            with self._open(f) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total

    def _records(self, f: InputFile) -> Iterator[list[dict[str, Any]]]:
        if f.format == "parquet":
            with self._open(f) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=self.batch_rows, columns=self.columns):
                    yield batch.to_pylist()
        elif f.format in ("csv", "tsv"):
            yield from self._csv_batches(f)
        else:
            yield from self._jsonl_batches(f)

    def _csv_batches(self, f: InputFile) -> Iterator[list[dict[str, Any]]]:
        def skip(bad_row) -> str:
            # A line with the wrong number of fields has no reliable columns: it is not a row.
            self.malformed_lines += 1
            return "skip"

        parse = pacsv.ParseOptions(
            delimiter="\t" if f.format == "tsv" else ",",
            quote_char=False if f.format == "tsv" else '"',  # captions in TSV lists often contain bare quotes
            invalid_row_handler=skip,
        )
        convert = pacsv.ConvertOptions(include_columns=self.columns,
                                       column_types={c: pa.string() for c in self.columns})
        with self._open(f) as fh:
            reader = pacsv.open_csv(fh, read_options=pacsv.ReadOptions(block_size=1 << 22, encoding="utf8"),
                                    parse_options=parse, convert_options=convert)
            for batch in reader:
                yield batch.to_pylist()

    def _jsonl_batches(self, f: InputFile) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        with self._open(f) as fh:
            for lineno, line in enumerate(io.TextIOWrapper(fh, encoding="utf-8-sig", errors="replace"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    record = {"__problem__": f"{f.shown} line {lineno}: not a JSON object row ({e})"}
                batch.append(record)
                if len(batch) >= self.batch_rows:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def iter_rows(self) -> Iterator[list[InputRow]]:
        """Batches of rows with their global index, in file order."""
        spec = self.spec
        index = 0
        for f in self.files:
            malformed_before = self.malformed_lines
            try:
                for records in self._records(f):
                    rows = []
                    for rec in records:
                        rows.append(InputRow(
                            row=index,
                            url=rec.get(spec.url_col),
                            caption=rec.get(spec.caption_col) if spec.caption_col else None,
                            extras={c: rec.get(c) for c in spec.extra_cols},
                            problem=rec.get("__problem__"),
                        ))
                        index += 1
                    yield rows
            except _READ_ERRORS as e:
                raise BuildInputError(f"{f.shown}: read failed after {index} rows: {e}") from None
            if self.malformed_lines > malformed_before:
                log.warning("%s: skipped %d lines with the wrong number of fields", f.shown,
                            self.malformed_lines - malformed_before)

    def iter_shards(self, samples_per_shard: int) -> Iterator[ShardJob]:
        """Consecutive groups of `samples_per_shard` rows; the last one may be shorter."""
        shard, pending = 0, []
        for rows in self.iter_rows():
            pending.extend(rows)
            while len(pending) >= samples_per_shard:
                yield ShardJob(shard, pending[:samples_per_shard])
                pending = pending[samples_per_shard:]
                shard += 1
        if pending:
            yield ShardJob(shard, pending)
