"""The compare page's eval table: the selected runs' final eval metrics side by side.

A row per (dataset, task, metric), a column per (run, model label): an eval job that scored an untrained and a
trained model gives two columns, so the two sit next to each other, and next to other runs' columns.
"""
from __future__ import annotations

from clipforge.dashboard.evals import key_parts


def compare_payload(rows: list[dict]) -> dict:
    """`rows`: the selected runs' rows, in the order chosen. Columns follow that order, then the order of each
    run's model labels by name; table rows are sorted by dataset, task and metric."""
    columns: list[dict] = []
    table: dict[tuple[str, str, str], dict[int, float]] = {}
    for row in rows:
        by_label: dict[str, dict[tuple[str, str, str], float]] = {}
        for key, value in row["evals"].items():
            p = key_parts(key)
            by_label.setdefault(p["model"], {})[(p["dataset"], p["task"], p["metric"])] = value
        for label in sorted(by_label):
            index = len(columns)
            columns.append({"run": row["id"], "name": row["name"], "model": label})
            for cell, value in by_label[label].items():
                table.setdefault(cell, {})[index] = value
    return {"columns": columns,
            "rows": [{"dataset": d, "task": t, "metric": m, "values": [values.get(i) for i in range(len(columns))]}
                     for (d, t, m), values in sorted(table.items())]}
