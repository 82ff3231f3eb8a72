"""pydantic validation errors as messages for people: `FILE:LINE: field a.b.c: message`, the line found
from the YAML key path (or the override that set the value)."""
from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import ValidationError

from clipforge.cluster.spec_kinds import KINDS


def _yaml_path(loc: tuple, data: Any) -> tuple:
    """Drop the union tags pydantic puts in error locations (`train`, `retrieval`, ...): they are not YAML keys."""
    out: list = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, str) and isinstance(node, dict) and part not in node and not last:
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


class ErrorItem(NamedTuple):
    """One validation problem: its YAML key path, that path as `a.b.c`, and the message for the user."""

    path: tuple
    field: str
    msg: str


def error_items(err: ValidationError, data: Any = None) -> list[ErrorItem]:
    items = []
    for e in err.errors():
        loc = e["loc"]
        if loc and isinstance(data, dict) and loc[0] == data.get("kind") and loc[0] not in data:
            loc = loc[1:]  # the job spec's own union tag: a check of the whole spec
        # `[key]` marks a problem with a mapping key itself (a sweep axis); the key's own path names it.
        about_key = "[key]" in loc
        path = tuple(p for p in _yaml_path(loc, data) if p != "[key]")
        field = ".".join(str(p) for p in path) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not part of this spec; check the spelling)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found") and path:
            # A tagged list item (an eval task): the tag field inside it is at fault.
            ctx = e.get("ctx", {})
            tag_field = str(ctx.get("discriminator", "")).strip("'")
            if tag_field:
                path = path + (tag_field,)
                field = f"{field}.{tag_field}"
            if e["type"] == "union_tag_invalid":
                msg = f"unknown {tag_field or 'type'} {ctx.get('tag')!r}; expected one of: {ctx.get('expected_tags')}"
            else:
                msg = f"missing `{tag_field or 'type'}`"
        elif e["type"] == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag")
            msg = f"unknown kind {tag!r}; expected one of: {', '.join(KINDS)}"
            field, path = "kind", ("kind",)
        elif e["type"] == "union_tag_not_found":
            msg = f"missing `kind`; expected one of: {', '.join(KINDS)}"
            field, path = "kind", ()
        else:
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            got = e.get("input")
            if got is not None and not isinstance(got, (dict, list)) and not about_key:
                msg = f"{msg} (got {got!r})"
        items.append(ErrorItem(path, field, msg))
    return items


def line_of(path: tuple, lines: dict[tuple, Any]) -> int | str | None:
    """The line of the key at `path`, else of its nearest ancestor that has one."""
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def where(source: str, line: int | str | None) -> str:
    """`FILE:LINE`, or the override that set the value (see apply_overrides), or the file alone."""
    if isinstance(line, str):
        return line
    return f"{source}:{line}" if line else source


def format_errors(err: ValidationError, lines: dict[tuple, int], source: str, data: Any = None) -> str:
    return "\n".join(f"{where(source, line_of(i.path, lines))}: field `{i.field}`: {i.msg}"
                     for i in error_items(err, data))
