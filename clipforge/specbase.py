"""Base class and shared sections for every typed spec.

Each component (pipeline, models, train, eval) owns the pydantic model of its own
section; `clipforge.cluster.specs` composes them into job specs by `kind`.
Unknown fields are errors so that a misspelt key never silently falls back to a default.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Spec(BaseModel):
    """Strict base: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class Scaling(Spec):
    """How many Ray workers a job uses and what each one reserves."""

    workers: int = Field(2, ge=1, description="Number of Ray workers (training processes or embedding actors).")
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="CPUs each worker reserves. Fractional values are allowed and needed on small machines.",
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker reserves (0 on CPU-only clusters).")
    resources: dict[str, float] = Field(default_factory=dict, description="Extra custom Ray resources per worker.")


class RayInit(Spec):
    """Where the job's Ray cluster is. `auto` joins a running cluster or starts a local one."""

    address: str | None = Field(None, description="Ray address; None starts or joins a local cluster.")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env for the job.")
