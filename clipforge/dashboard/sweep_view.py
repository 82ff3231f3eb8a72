"""The sweep page's data: each child's swept values next to its final eval metrics and numbers.

Only a folder with sweep.json is a sweep (the sweep runner writes it, with the swept fields and each child's
values and state); a plain folder of runs has no swept values to show.
"""
from __future__ import annotations

from clipforge.dashboard.evals import key_parts
from clipforge.dashboard.sweeps import child_states, child_values, swept_fields

# Numbers of a run's row shown beside its metrics.
ROW_NUMBERS = ("loss", "samples_seen", "compute", "wall_seconds")


def sweep_payload(sweep_id: str, sweep: dict, rows: list[dict]) -> dict:
    """Children in sweep.json's order, then runs in the folder that sweep.json does not list (a child added by
    hand); each with its run's row fields where the run directory exists yet."""
    values, states = child_values(sweep), child_states(sweep)
    members = {r["id"].rsplit("/", 1)[-1]: r for r in rows if (r.get("folder") or "") == sweep_id}
    names = list(dict.fromkeys([*values, *states, *sorted(members)]))
    children = [_child(name, values.get(name, {}), states.get(name, {}), members.get(name)) for name in names]
    metrics = sorted({k for c in children for k in c["evals"]})
    return {"id": sweep_id, "name": sweep.get("name") or sweep_id, "fields": swept_fields(sweep),
            "children": children, "metrics": metrics, "metric_parts": {k: key_parts(k) for k in metrics}}


def _child(name: str, values: dict, state: dict, row: dict | None) -> dict:
    out = {"dir": name, "id": None, "name": name, "values": values,
           "status": state.get("status") or "pending", "error": state.get("error"), "evals": {}}
    if row is not None:
        # The run directory says more than sweep.json about a run that is going (or went) on.
        out.update(id=row["id"], name=row["name"], status=row["status"], error=row.get("error") or out["error"],
                   evals=row["evals"], **{k: row.get(k) for k in ROW_NUMBERS})
    return out
