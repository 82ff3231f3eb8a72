"""Base class and shared sections for every typed spec.

Each component (pipeline, models, train, eval) owns the pydantic model of its own
section; `clipforge.cluster.specs` composes them into job specs by `kind`.
Rules every spec follows, so that a mistake is refused at validation rather than found at run time:
  - unknown fields are errors (a misspelt key never silently falls back to a default);
  - floats are finite everywhere (`.inf`, `.nan`, `1e309` are refused);
  - strings are never empty or blank (an empty path, name or column means nothing; `null` says "none"
    where a field allows it), in lists too;
  - output folders (`OutputFolder`) cannot be the current folder or the root.
"""
from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator


def _refuse_blank(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, str) and not item.strip():
                raise ValueError(f"item #{i} must not be empty")
    return value


class Spec(BaseModel):
    """Strict base: unknown keys are rejected, floats are finite, strings are not blank, values are validated on
    assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_blank_strings(cls, value: Any) -> Any:
        return _refuse_blank(value)


# Validation context of specs a user hands in (`clipforge validate/run/submit`): checks that look at this machine
# (does the model config file exist? the template file?) run only then, not when a program builds a spec in code
# or a worker re-reads the spec its driver already checked.
USER_SPEC = {"user_spec": True}


def checking_user_spec(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("user_spec"))


def _not_here(path: str) -> str:
    # An empty output path used to mean the current folder, where a build overwrote a user's own stats.json.
    _refuse_blank(path)
    if "://" not in path and os.path.normpath(os.path.expanduser(path.strip())) in (".", os.sep):
        raise ValueError(f"{path!r} is the current folder or the root; name a folder of its own for the job")
    return path


# A folder a job writes into (see `clipforge.runtime.output_folder` for what it may already hold).
OutputFolder = Annotated[str, AfterValidator(_not_here)]


class Scaling(Spec):
    """How many Ray workers a job uses and what each one reserves."""

    workers: int = Field(2, ge=1, le=100_000,
                         description="Number of Ray workers (training processes or embedding actors).")
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        le=1024,
        description="CPUs each worker reserves. Fractional values are allowed and needed on small machines.",
    )
    gpus_per_worker: float = Field(0.0, ge=0, le=64, description="GPUs each worker reserves (0 on CPU-only clusters).")
    resources: dict[str, float] = Field(default_factory=dict, description="Extra custom Ray resources per worker.")


class RayInit(Spec):
    """Where the job's Ray cluster is. `auto` joins a running cluster or starts a local one."""

    address: str | None = Field(None, description="Ray address; None starts or joins a local cluster.")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env for the job.")
