"""Job specs: YAML in, one typed pydantic model per `kind` out, errors that name the field and line.

YAML is read with a safe loader only (`spec_yaml.py`: plain data, bounded size, depth and aliases),
overrides are set by field path (`spec_overrides.py`), and every validation error is reported as
`FILE:LINE: field a.b.c: message` (`spec_errors.py`). The kinds are in `spec_kinds.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clipforge.cluster.spec_errors import format_errors
from clipforge.cluster.spec_kinds import JOB_SPEC
from clipforge.cluster.spec_overrides import apply_overrides
from clipforge.cluster.spec_yaml import read_spec_file
from clipforge.cluster.sweep_children import expand_children, resolve_base
from clipforge.errors import SpecError
from clipforge.specbase import USER_SPEC


def validate_spec(data: Any, lines: dict[tuple, int] | None = None, source: str = "<spec>",
                  base_dir: str | Path | None = None):
    """The typed spec of a spec dict, or SpecError. A sweep's children are built and validated too
    (its `base` path, relative to `base_dir`, is made absolute)."""
    if data is None:
        raise SpecError(f"{source}: the spec is empty; it must be a YAML mapping with a `kind:` field")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping with a `kind:` field, got {type(data).__name__}")
    try:
        spec = JOB_SPEC.validate_python(data, context=USER_SPEC)
    except ValidationError as e:
        raise SpecError(format_errors(e, lines or {}, source, data)) from None
    if spec.kind == "sweep":
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
