"""Reading an image-path + caption table (csv, tsv, parquet, jsonl; local or fsspec) into plain rows.

Only the two named columns are read. Every problem with the table itself (not found, not readable
in its format, a column missing) is an error naming the file, and the column where there is one;
the cells' meaning (paths, caption lists) is left to the caller.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
            ".ndjson": "jsonl", ".json": "jsonl"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_READ_ERRORS = (OSError, EOFError, ValueError, csv.Error, UnicodeDecodeError, pa.ArrowException)


@dataclass(frozen=True)
class TableRow:
    where: str  # "row N" (data rows from 1, the header not counted), plus "line L" in text formats
    image: object
    caption: object


def table_format(path: str, given: str = "auto") -> str:
    """`csv`, `tsv`, `parquet` or `jsonl`: `given`, or told by the extension (after any .gz/.bz2/.xz/.zst)."""
    if given != "auto":
        return given
    name = path.rsplit("/", 1)[-1].lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    dot = name.rfind(".")
    fmt = _FORMATS.get(name[dot:] if dot >= 0 else "")
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the table format from its name; set table_format to csv, tsv, "
                         "parquet or jsonl")
    return fmt


def _missing_column(path: str, column: str, role: str, available: list[str]) -> ValueError:
    shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
    return ValueError(f"{path}: column `{column}` ({role}) not found; the table has: {shown or '(no columns)'}")


def _check_columns(path: str, available: list[str], columns: dict[str, str]) -> None:
    for column, role in columns.items():
        if column not in available:
            raise _missing_column(path, column, role, available)


def _parquet_rows(path: str, f, columns: dict[str, str]) -> list[TableRow]:
    parquet = pq.ParquetFile(f)
    _check_columns(path, parquet.schema_arrow.names, columns)
    image_col, caption_col = columns
    table = parquet.read(columns=list(dict.fromkeys(columns)))
    images, captions = table.column(image_col).to_pylist(), table.column(caption_col).to_pylist()
    return [TableRow(f"row {i + 1}", im, cap) for i, (im, cap) in enumerate(zip(images, captions))]


def _delimited_rows(path: str, f, fmt: str, columns: dict[str, str]) -> list[TableRow]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    # TSV captions often hold bare quotes: in TSV a quote is an ordinary character.
    reader = csv.DictReader(text, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.DictReader(text)
    if reader.fieldnames is None:
        raise ValueError(f"{path}: empty table (a header line with column names is required)")
    _check_columns(path, [c.strip() for c in reader.fieldnames], columns)
    image_col, caption_col = columns
    rows = []
    for n, record in enumerate(reader, 1):
        record = {(k.strip() if isinstance(k, str) else k): v for k, v in record.items()}
        rows.append(TableRow(f"row {n} (line {reader.line_num})", record.get(image_col), record.get(caption_col)))
    return rows


def _jsonl_rows(path: str, f, columns: dict[str, str]) -> list[TableRow]:
    image_col, caption_col = columns
    rows: list[TableRow] = []
    for line_no, line in enumerate(io.TextIOWrapper(f, encoding="utf-8-sig"), 1):
        if not line.strip():
            continue
        where = f"row {len(rows) + 1} (line {line_no})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {where} is not JSON: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: {where} is not a JSON object")
        if not rows:
            # The first record stands for the header: a column it lacks is a misnamed column.
            _check_columns(path, list(record), columns)
        rows.append(TableRow(where, record.get(image_col), record.get(caption_col)))
    return rows


def read_table_rows(path: str, image_column: str, caption_column: str, fmt: str = "auto") -> list[TableRow]:
    """Every data row of the table at `path`: its image cell and caption cell, as stored (None where empty)."""
    fmt = table_format(path, fmt)
    columns = {image_column: "image_column"}
    columns.setdefault(caption_column, "caption_column")
    if len(columns) == 1:
        raise ValueError(f"{path}: image_column and caption_column are both `{image_column}`")
    try:
        with fsspec.open(path, "rb", compression=None if fmt == "parquet" else "infer") as f:
            if fmt == "parquet":
                rows = _parquet_rows(path, f, columns)
            elif fmt == "jsonl":
                rows = _jsonl_rows(path, f, columns)
            else:
                rows = _delimited_rows(path, f, fmt, columns)
    except FileNotFoundError:
        raise ValueError(f"{path}: table not found") from None
    except _READ_ERRORS as e:
        if isinstance(e, ValueError) and str(e).startswith(f"{path}: "):
            raise  # already names the file and the problem
        raise ValueError(f"{path}: cannot read as {fmt}: {type(e).__name__}: {e}") from None
    if not rows:
        raise ValueError(f"{path}: the table has no data rows")
    return rows
