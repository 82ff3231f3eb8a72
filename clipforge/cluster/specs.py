"""Job specs: YAML in, one typed pydantic model per `kind` out, errors that name the field and line.

YAML is read with a safe loader only (no Python object tags), duplicate keys are errors,
and every validation error is reported as `FILE:LINE: field a.b.c: message`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from clipforge.eval.spec import EvalSpec
from clipforge.pipeline.spec import BuildSpec
from clipforge.train.spec import TrainSpec

JobSpec = Annotated[Union[BuildSpec, TrainSpec, EvalSpec], Field(discriminator="kind")]
KINDS = {"build": BuildSpec, "train": TrainSpec, "eval": EvalSpec}
_ADAPTER: TypeAdapter = TypeAdapter(JobSpec)


class SpecError(ValueError):
    """A spec that cannot be read or validated. The message names the file, line and field."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and remembers the line of every mapping key."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise SpecError(f"line {key_node.start_mark.line + 1}: duplicate key `{key}`")
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path (as a tuple) to its 1-based line in the YAML text."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = prefix + (k.value,)
            lines[path] = k.start_mark.line + 1
            lines.update(_key_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[prefix + (i,)] = v.start_mark.line + 1
            lines.update(_key_lines(v, prefix + (i,)))
    return lines


def parse_yaml(text: str, source: str = "<spec>") -> tuple[Any, dict[tuple, int]]:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader derives from SafeLoader
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SpecError(f"{where}: YAML tag not allowed ({e.problem}); specs are plain data") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{where}: invalid YAML: {problem}") from None
    return data, (_key_lines(node) if node is not None else {})


def _coerce_scalar(text: str) -> Any:
    return yaml.safe_load(io.StringIO(text)) if text.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a spec dict."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override `{item}`: expected FIELD=VALUE, e.g. optim.lr=1e-4")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        cur = data
        for k in keys[:-1]:
            nxt = cur.get(k) if isinstance(cur, dict) else None
            if nxt is None:
                nxt = {}
                cur[k] = nxt
            if not isinstance(nxt, dict):
                raise SpecError(f"override `{item}`: `{k}` is not a section")
            cur = nxt
        cur[keys[-1]] = _coerce_scalar(raw)
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


def _format_errors(err: ValidationError, lines: dict[tuple, int], source: str, data: Any = None) -> str:
    msgs = []
    for e in err.errors():
        path = _yaml_path(e["loc"], data)
        line = None
        for n in range(len(path), 0, -1):
            if path[:n] in lines:
                line = lines[path[:n]]
                break
        field = ".".join(str(p) for p in path) or "(top level)"
        where = f"{source}:{line}" if line else source
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not part of this spec; check the spelling)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag")
            msg = f"unknown kind {tag!r}; expected one of: {', '.join(KINDS)}"
            field = "kind"
        elif e["type"] == "union_tag_not_found":
            msg = f"missing `kind`; expected one of: {', '.join(KINDS)}"
            field = "kind"
        else:
            got = e.get("input")
            if got is not None and not isinstance(got, (dict, list)):
                msg = f"{msg} (got {got!r})"
        msgs.append(f"{where}: field `{field}`: {msg}")
    return "\n".join(msgs)


def validate_spec(data: Any, lines: dict[tuple, int] | None = None, source: str = "<spec>"):
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping with a `kind:` field, got {type(data).__name__}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, lines or {}, source, data)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None):
    """Read, override and validate a job spec file. Raises SpecError with a message naming file/line/field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read spec file: {e}") from None
    data, lines = parse_yaml(text, str(path))
    if overrides:
        if not isinstance(data, dict):
            raise SpecError(f"{path}: a spec must be a YAML mapping")
        data = apply_overrides(data, overrides)
    return validate_spec(data, lines, str(path))


def dump_spec(spec) -> str:
    """The spec as YAML, every default filled in (written into run directories)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
