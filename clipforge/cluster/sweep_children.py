"""A sweep's children: the base job spec with each child's field values, a short unique folder name per
child, and every child validated as a full job spec before anything runs.

Errors name where to fix them: a problem with a swept field points at that axis's line in the sweep file,
anything else at the base spec's line (its own file, or the inline `base:` section), and every error says
which children it hits: `sweep.yaml:7: child lr0.1-bs32: field `optim.lr`: ...`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clipforge.cluster.spec_errors import error_items, line_of, where
from clipforge.cluster.spec_kinds import KINDS
from clipforge.cluster.spec_overrides import set_field
from clipforge.cluster.spec_yaml import read_spec_file
from clipforge.errors import SpecError
from clipforge.specbase import USER_SPEC

CHILD_KINDS = ("build", "train", "eval")
# The field holding each kind's run directory (where its outputs go).
RUN_DIR_FIELD = {"build": "output.path", "train": "storage", "eval": "storage"}
MAX_DIR_CHARS = 60
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


@dataclass(frozen=True)
class Child:
    """One job of a sweep: its folder under the sweep's storage, its swept values and its validated spec."""

    dir: str
    values: dict[str, Any]
    spec: Any

    @property
    def run_dir(self) -> str:
        return self.spec.output.path if self.spec.kind == "build" else self.spec.storage


@dataclass(frozen=True)
class _Base:
    """The base spec's data and where its keys are, for error messages."""

    data: dict
    lines: dict[tuple, int]
    source: str
    prefix: tuple  # key path of the base inside `lines` (("base",) when inline)


def storage_root(storage: str) -> str:
    """The sweep folder: remote paths as given, local ones absolute (children may run in other processes)."""
    if "://" in storage:
        return storage.rstrip("/")
    return os.path.abspath(os.path.expanduser(storage))


def join_path(folder: str, name: str) -> str:
    """`folder/name` for local and fsspec paths alike."""
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)


def resolve_base(spec, base_dir: str | Path | None = None) -> None:
    """Make a base spec path absolute (relative paths are relative to the sweep file's folder)."""
    if isinstance(spec.base, str) and "://" not in spec.base:
        path = Path(spec.base).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or ".") / path
        spec.base = os.path.abspath(path)


def _load_base(spec, lines: dict, source: str) -> _Base:
    at = where(source, line_of(("base",), lines))
    if isinstance(spec.base, str):
        if "://" in spec.base:
            raise SpecError(f"{at}: field `base`: {spec.base!r}: give a local spec file or the spec inline")
        try:
            data, base_lines = read_spec_file(spec.base)
        except SpecError as e:
            raise SpecError(f"{at}: field `base`: {e}") from None
        if data is None:
            raise SpecError(f"{at}: field `base`: {spec.base}: the spec file is empty")
        base = _Base(data, base_lines, spec.base, ())
    else:
        base = _Base(copy.deepcopy(spec.base), lines, source, ("base",))
    if not isinstance(base.data, dict):
        raise SpecError(f"{at}: field `base`: the base spec must be a mapping with a `kind:` field")
    kind = base.data.get("kind")
    if kind not in CHILD_KINDS:
        kind_at = where(base.source, line_of(base.prefix + ("kind",), base.lines))
        got = "no `kind`" if kind is None else f"kind {kind!r}"
        raise SpecError(f"{kind_at}: field `{'.'.join(map(str, base.prefix + ('kind',)))}`: the base spec has {got}; "
                        f"a sweep's children are one of: {', '.join(CHILD_KINDS)}")
    return base


def _field_tags(fields: list[str]) -> dict[str, str]:
    """Short name of each swept field for folder names: the last path part, initials when it has several
    words (`data.batch_size` -> `bs`, `optim.lr` -> `lr`); whole paths where short names would collide."""

    def parts(field: str) -> list[str]:
        return [p for p in field.split(".") if not p.isdigit()] or [field]

    def short(field: str) -> str:
        words = [w for w in parts(field)[-1].split("_") if w]
        return "".join(w[0] for w in words) if len(words) > 1 else parts(field)[-1]

    tags = {f: short(f) for f in fields}
    clashing = {t for t in tags.values() if list(tags.values()).count(t) > 1}
    return {f: ("_".join(parts(f)) if t in clashing else t) for f, t in tags.items()}


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return _UNSAFE.sub("_", text).strip("_.") or "x"


def _digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def child_names(overrides: list[dict[str, Any]]) -> list[str]:
    """A short, filesystem-safe, unique folder name per child, from its values: `lr0.001-bs32`,
    `name_tiny`; a name that would be ambiguous or too long gets a hash of the values appended."""
    tags = _field_tags(list(dict.fromkeys(f for values in overrides for f in values)))
    names = []
    for values in overrides:
        parts = []
        for field, value in values.items():
            text = _value_text(value)
            parts.append(tags[field] + ("_" + text if text[0].isalpha() else text))
        name = "-".join(parts) or "base"
        if len(name) > MAX_DIR_CHARS:
            name = name[:MAX_DIR_CHARS - 9].rstrip("-_.") + "-" + _digest(values)[:8]
        names.append(name)
    ambiguous = {n for n in names if names.count(n) > 1}
    return [f"{n}-{_digest(values)[:6]}" if n in ambiguous else n for n, values in zip(names, overrides)]


def _check_distinct(spec, overrides: list[dict], lines: dict, source: str) -> None:
    if spec.grid is not None:
        for field, values in spec.grid.items():
            seen: list = []
            for v in values:
                if v in seen:
                    raise SpecError(f"{where(source, line_of(('grid', field), lines))}: field `grid.{field}`: "
                                    f"value {v!r} is listed twice")
                seen.append(v)
        return
    for i, values in enumerate(overrides):
        if values in overrides[:i]:
            raise SpecError(f"{where(source, line_of(('list', i), lines))}: field `list.{i}`: the same child as "
                            f"`list.{overrides.index(values)}`")


def _related(error_path: tuple, msg: str, field: str) -> bool:
    """Whether a validation error is about the swept field `field`: at it or inside it, or a check of a
    section around it (or of the whole spec) whose message names it."""
    a, b = tuple(str(p) for p in error_path), tuple(field.split("."))
    if len(a) >= len(b):
        return a[:len(b)] == b
    return a == b[:len(a)] and re.search(rf"\b{re.escape(b[-1])}\b", msg) is not None


class _Errors:
    """Error lines of all children, each line once with the children it hits."""

    def __init__(self, total: int):
        self.total = total
        self.children: dict[tuple[str, str], list[str]] = {}

    def add(self, at: str, child: str, text: str) -> None:
        self.children.setdefault((at, text), []).append(child)

    def raise_any(self) -> None:
        if not self.children:
            return
        out = []
        for (at, text), names in self.children.items():
            if len(names) == self.total > 1:
                who = f"every child ({self.total})"
            elif len(names) == 1:
                who = f"child {names[0]}"
            else:
                who = "children " + ", ".join(names)
            out.append(f"{at}: {who}: {text}")
        raise SpecError("\n".join(out))


def expand_children(spec, lines: dict[tuple, int] | None = None, source: str = "<sweep>") -> list[Child]:
    """Every child of a validated sweep spec, each validated as a full job spec; SpecError naming the line,
    child and field of every problem."""
    lines = lines or {}
    base = _load_base(spec, lines, source)
    kind = base.data["kind"]
    overrides = spec.child_overrides()
    _check_distinct(spec, overrides, lines, source)
    names = child_names(overrides)
    root = storage_root(spec.storage)

    def axis_line(field: str, index: int) -> str:
        if spec.grid is not None and field in spec.grid:
            return where(source, line_of(("grid", field), lines))
        if spec.variants is not None and field in overrides[index]:
            return where(source, line_of(("list", index, field), lines))
        return where(source, line_of(("overrides", field), lines))

    errors = _Errors(len(overrides))
    children = []
    for i, (name, values) in enumerate(zip(names, overrides)):
        data = copy.deepcopy(base.data)
        swept = {**spec.overrides, **values}
        try:
            for field, value in swept.items():
                try:
                    set_field(data, field, copy.deepcopy(value))
                except ValueError as e:
                    errors.add(axis_line(field, i), name, f"field `{field}`: {e}")
                    raise
        except ValueError:
            continue
        set_field(data, RUN_DIR_FIELD[kind], join_path(root, name))
        data["name"] = f"{spec.name}-{name}"
        try:
            children.append(Child(name, dict(values), KINDS[kind].model_validate(data, context=USER_SPEC)))
        except ValidationError as e:
            for item in error_items(e, data):
                field = next((f for f in swept if _related(item.path, item.msg, f)), None)
                if field is not None:
                    at = axis_line(field, i)
                else:
                    at = where(base.source, line_of(base.prefix + item.path, base.lines))
                errors.add(at, name, f"field `{item.field}`: {item.msg}")
    errors.raise_any()
    return children
