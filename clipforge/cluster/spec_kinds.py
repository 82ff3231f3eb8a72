"""The job spec kinds: `kind:` -> its typed spec (each component owns its own section's model)."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from clipforge.cluster.sweep_spec import SweepSpec
from clipforge.eval.spec import EvalSpec
from clipforge.pipeline.spec import BuildSpec
from clipforge.specbase import Spec
from clipforge.train.spec import TrainSpec

JobSpec = Annotated[Union[BuildSpec, TrainSpec, EvalSpec, SweepSpec], Field(discriminator="kind")]
KINDS: dict[str, type[Spec]] = {"build": BuildSpec, "train": TrainSpec, "eval": EvalSpec, "sweep": SweepSpec}
JOB_SPEC: TypeAdapter = TypeAdapter(JobSpec)
