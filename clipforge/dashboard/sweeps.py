"""sweep.json of a sweep folder: which child runs it has and which spec fields it varies.

Read tolerantly, as the file may be written by different tools: the swept fields may be a list of
names or a mapping of name -> values (under `fields`, `swept`, `parameters` or `axes`); children may
be folder names or objects naming the folder (`dir`, `name`, `path`, `id` or `run`) with their values
(`values`, `params`, `overrides` or `config`).
"""
from __future__ import annotations

import json

from clipforge.dashboard.tree import RunTree

_FIELD_KEYS = ("fields", "swept", "parameters", "axes")
_CHILD_LIST_KEYS = ("children", "runs", "trials")
_CHILD_NAME_KEYS = ("dir", "name", "path", "id", "run")
_CHILD_VALUE_KEYS = ("values", "params", "overrides", "config")


def read_sweep_file(tree: RunTree, path: str) -> dict:
    """The parsed sweep.json, or {} when it is unreadable or half-written."""
    try:
        obj = json.loads(tree.read_bytes(path))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def swept_fields(sweep: dict) -> list[str]:
    for key in _FIELD_KEYS:
        value = sweep.get(key)
        if isinstance(value, dict):
            return [str(k) for k in value]
        if isinstance(value, list):
            out = []
            for item in value:
                if isinstance(item, str):
                    out.append(item)
                elif isinstance(item, dict) and isinstance(name := item.get("field") or item.get("name"), str):
                    out.append(name)
            return out
    return []


def _child_name(item) -> str | None:
    if isinstance(item, str):
        return item.rstrip("/").rsplit("/", 1)[-1]
    if isinstance(item, dict):
        for key in _CHILD_NAME_KEYS:
            if isinstance(item.get(key), str):
                return item[key].rstrip("/").rsplit("/", 1)[-1]
    return None


def child_values(sweep: dict) -> dict[str, dict]:
    """Child folder name -> the swept field values of that child, as far as sweep.json says."""
    fields = swept_fields(sweep)
    out: dict[str, dict] = {}
    for key in _CHILD_LIST_KEYS:
        children = sweep.get(key)
        if isinstance(children, dict):
            children = [{"dir": k, "values": v} for k, v in children.items()]
        if not isinstance(children, list):
            continue
        for item in children:
            name = _child_name(item)
            if name is None or not isinstance(item, dict):
                continue
            values = next((item[v] for v in _CHILD_VALUE_KEYS if isinstance(item.get(v), dict)), None)
            if values is None:
                values = {f: item[f] for f in fields if f in item}
            elif fields:
                values = {f: values[f] for f in fields if f in values}
            out[name] = dict(values)
    return out


def child_states(sweep: dict) -> dict[str, dict]:
    """Child folder name -> {status, error} as sweep.json records them (the sweep runner writes both)."""
    out: dict[str, dict] = {}
    for key in _CHILD_LIST_KEYS:
        children = sweep.get(key)
        if not isinstance(children, list):
            continue
        for item in children:
            name = _child_name(item)
            if name is not None and isinstance(item, dict):
                out[name] = {"status": item.get("status"), "error": item.get("error")}
    return out
