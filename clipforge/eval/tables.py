"""The merged results table of an eval job: one row per (model, dataset, task), one column per metric.

Written as `results.csv` (full precision; NaN as `nan`, an empty cell where a task has no such
metric) and `results.md` (a Markdown table, 4 decimals; non-zero values under 5e-4 in scientific notation).
"""
from __future__ import annotations

import csv
import io
import math

KEY_COLUMNS = ("model", "pretrained", "dataset", "task")


def metric_columns(results: list[dict]) -> list[str]:
    """Every metric name, in the order first met."""
    seen: dict[str, None] = {}
    for r in results:
        for name in r["metrics"]:
            seen.setdefault(name, None)
    return list(seen)


def table_rows(results: list[dict]) -> tuple[list[str], list[list]]:
    columns = metric_columns(results)
    rows = [[r[c] for c in KEY_COLUMNS] + [r["metrics"].get(m) for m in columns] for r in results]
    return [*KEY_COLUMNS, *columns], rows


def to_csv(results: list[dict]) -> str:
    header, rows = table_rows(results)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        # Metrics read best with 4 decimals; tiny non-zero values (a chosen weight decay) would print as 0.0000.
        return f"{value:.1e}" if 0 < abs(value) < 5e-4 else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def to_markdown(results: list[dict]) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
