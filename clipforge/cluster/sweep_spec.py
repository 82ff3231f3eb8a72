"""Typed spec of a sweep (`kind: sweep`): one base job spec and the field values its children vary.

Only the shape is checked here (axes, paths, concurrency); every child is built and validated as a
full job spec by `clipforge.cluster.sweep_children` before anything runs.
"""
from __future__ import annotations

import itertools
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from clipforge.specbase import OutputFolder, RayInit, Spec

# Dotted field paths as `clipforge run SPEC a.b.c=value` takes them; list items by index (eval_tasks.0.dataset).
FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*$")
# Set by the sweep for every child: the child's kind is the base's, its run directory is STORAGE/<child name>
# (`output.path` for a build) and its name is `<sweep name>-<child name>`.
RESERVED_FIELDS = ("kind", "name", "storage", "output.path")


def check_field_path(path: str) -> str:
    if not FIELD_PATH.match(path):
        raise ValueError(f"`{path}` is not a field path like optim.lr or eval_tasks.0.dataset")
    for reserved in RESERVED_FIELDS:
        if path == reserved or path.startswith(reserved + ".") or reserved.startswith(path + "."):
            raise ValueError(f"`{path}` cannot be swept: the sweep sets each child's kind, name and run directory "
                             "(STORAGE/<child name>)")
    return path


FieldPath = Annotated[str, AfterValidator(check_field_path)]
AxisValues = Annotated[list[Any], Field(min_length=1)]


class SweepSpec(Spec):
    """`kind: sweep` — run one job spec many times with different field values (a grid or a list)."""

    kind: Literal["sweep"]
    name: str = Field("sweep", min_length=1, description="Sweep name; children are named `<name>-<child name>`.")
    storage: OutputFolder = Field(
        ..., min_length=1, description="Sweep folder (local or fsspec): sweep.json and one run directory per child, "
        "STORAGE/<child name>. With `clipforge submit` it must be a path the cluster's jobs can write (shared or "
        "remote storage).",
    )
    base: str | dict[str, Any] = Field(
        ..., description="The job spec every child starts from: a path to a build/train/eval spec YAML (relative "
        "paths are relative to the sweep file's folder) or the spec itself, inline.",
    )
    grid: Optional[dict[FieldPath, AxisValues]] = Field(
        None, description="Field path -> values; one child per combination (cartesian product, in the order given)."
    )
    variants: Optional[Annotated[list[dict[FieldPath, Any]], Field(min_length=1)]] = Field(
        None, alias="list", description="Children as a list of {field path: value} overrides, instead of `grid`."
    )
    overrides: dict[FieldPath, Any] = Field(
        default_factory=dict, description="Field path -> value set in every child before its own values (e.g. a "
        "shorter schedule for a quick variant of a shared base spec).",
    )
    overwrite: bool = Field(
        False, description="Write into `storage` even if it holds files of something else; without it the folder "
        "must be empty, missing, or this sweep's own earlier output (whose finished children are then skipped).",
    )
    max_concurrent: int = Field(
        1, ge=1, le=1024,
        description="Children running at once: 1 runs them one after another in this process; more runs "
        "them as Ray tasks (local) or as that many submitted jobs (`clipforge submit`).",
    )
    ray: RayInit = Field(default_factory=RayInit, description="Ray for children run locally.")

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _one_axis_form(self) -> "SweepSpec":
        if (self.grid is None) == (self.variants is None):
            raise ValueError("give exactly one of `grid` (a cartesian product) and `list` (explicit children)")
        if self.grid is not None and not self.grid:
            raise ValueError("`grid` has no fields; give at least one `field.path: [values]`")
        return self

    def child_overrides(self) -> list[dict[str, Any]]:
        """Each child's {field path: value}, in order: the grid's product or the list as given."""
        if self.grid is not None:
            keys = list(self.grid)
            return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]
        return [dict(entry) for entry in self.variants or []]

    def axes(self) -> dict[str, list[Any]]:
        """Swept field -> its values (for a list: the distinct values its children use, in order)."""
        if self.grid is not None:
            return {k: list(v) for k, v in self.grid.items()}
        out: dict[str, list[Any]] = {}
        for entry in self.variants or []:
            for k, v in entry.items():
                if v not in out.setdefault(k, []):
                    out[k].append(v)
        return out
