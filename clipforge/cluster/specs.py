"""Job specs: YAML in, one typed pydantic model per `kind` out, errors that name the field and line.

YAML is read with a safe loader only (no Python object tags), duplicate keys are errors,
and every validation error is reported as `FILE:LINE: field a.b.c: message`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NamedTuple, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from clipforge.cluster.spec_yaml import MAX_SPEC_BYTES, parse_scalar, parse_yaml
from clipforge.cluster.sweep_spec import SweepSpec
from clipforge.errors import SpecError
from clipforge.eval.spec import EvalSpec
from clipforge.pipeline.spec import BuildSpec
from clipforge.specbase import USER_SPEC
from clipforge.train.spec import TrainSpec

JobSpec = Annotated[Union[BuildSpec, TrainSpec, EvalSpec, SweepSpec], Field(discriminator="kind")]
KINDS = {"build": BuildSpec, "train": TrainSpec, "eval": EvalSpec, "sweep": SweepSpec}
_ADAPTER: TypeAdapter = TypeAdapter(JobSpec)


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


def _format_errors(err: ValidationError, lines: dict[tuple, int], source: str, data: Any = None) -> str:
    return "\n".join(f"{where(source, line_of(i.path, lines))}: field `{i.field}`: {i.msg}"
                     for i in error_items(err, data))


def validate_spec(data: Any, lines: dict[tuple, int] | None = None, source: str = "<spec>",
                  base_dir: str | Path | None = None):
    """The typed spec of a spec dict, or SpecError. A sweep's children are built and validated too
    (its `base` path, relative to `base_dir`, is made absolute)."""
    if data is None:
        raise SpecError(f"{source}: the spec is empty; it must be a YAML mapping with a `kind:` field")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping with a `kind:` field, got {type(data).__name__}")
    try:
        spec = _ADAPTER.validate_python(data, context=USER_SPEC)
    except ValidationError as e:
        raise SpecError(_format_errors(e, lines or {}, source, data)) from None
    if spec.kind == "sweep":
        from clipforge.cluster.sweep_children import expand_children, resolve_base

        resolve_base(spec, base_dir)
        expand_children(spec, lines or {}, source)
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None):
    """Read, override and validate a job spec file. Raises SpecError with a message naming file/line/field."""
    p = Path(path)
    data, lines = read_spec_file(p)
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides, lines)
    return validate_spec(data, lines, str(path), base_dir=p.parent)


def read_spec_file(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """The parsed YAML of a spec file and the line of each key, or SpecError."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_SPEC_BYTES and Path(path).is_file():
            raise SpecError(f"{path}: {size:,} bytes; a spec file may have at most {MAX_SPEC_BYTES:,}")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a spec file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read spec file: {e}") from None
    return parse_yaml(text, str(path))


def dump_spec(spec) -> str:
    """The spec as YAML, every default filled in (written into run directories)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
