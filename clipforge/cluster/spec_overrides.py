"""Command-line overrides (`optim.lr=1e-4`) and sweep values set into a spec's data by dotted field path."""
from __future__ import annotations

from typing import Any

from clipforge.cluster.spec_yaml import parse_scalar
from clipforge.errors import SpecError


def _coerce_scalar(text: str, item: str) -> Any:
    return parse_scalar(text, f"override `{item}`")


def set_field(data: dict, dotted: str, value: Any) -> None:
    """Set the field at a dotted path (`optim.lr`, `eval_tasks.0.dataset`) in a spec dict, creating missing
    sections. A mapping key that itself holds dots (a sweep's `grid: {optim.lr: ...}`) is matched whole.
    Raises ValueError naming the part of the path that is not a section."""
    keys = dotted.strip().split(".")
    cur: Any = data
    i = 0
    while i < len(keys) - 1:
        rest = ".".join(keys[i:])
        if isinstance(cur, dict) and rest in cur:
            break
        k = keys[i]
        if isinstance(cur, list):
            if not k.isdigit() or int(k) >= len(cur):
                raise ValueError(f"`{'.'.join(keys[:i])}` is a list of {len(cur)}; `{k}` is not an index in it")
            nxt = cur[int(k)]
            if not isinstance(nxt, (dict, list)):
                raise ValueError(f"`{'.'.join(keys[:i + 1])}` is not a section")
            cur = nxt
        else:
            nxt = cur.get(k)
            if nxt is None:
                nxt = cur[k] = {}
            if not isinstance(nxt, (dict, list)):
                raise ValueError(f"`{'.'.join(keys[:i + 1])}` is not a section")
            cur = nxt
        i += 1
    last = ".".join(keys[i:]) if isinstance(cur, dict) and ".".join(keys[i:]) in cur else keys[-1]
    if isinstance(cur, list):
        if not last.isdigit() or int(last) >= len(cur):
            raise ValueError(f"`{'.'.join(keys[:-1])}` is a list of {len(cur)}; `{last}` is not an index in it")
        cur[int(last)] = value
    else:
        cur[last] = value


def _override_path(dotted: str) -> tuple:
    return tuple(int(k) if k.isdigit() else k for k in dotted.strip().split("."))


def apply_overrides(data: dict, overrides: list[str], lines: dict[tuple, Any] | None = None) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a spec dict.

    With `lines` (key path -> line), each overridden path is marked there with the override's own text, so a
    validation error about it names the override instead of a line of the file that no longer holds the value.
    """
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override `{item}`: expected FIELD=VALUE, e.g. optim.lr=1e-4")
        dotted, raw = item.split("=", 1)
        try:
            set_field(data, dotted, _coerce_scalar(raw, item))
        except ValueError as e:
            raise SpecError(f"override `{item}`: {e}") from None
        if lines is not None:
            path = _override_path(dotted)
            for key in [k for k in lines if k[:len(path)] == path]:
                del lines[key]
            lines[path] = f"override `{item}`"
    return data
