"""The run directory: its file names, and the writers and readers of the files every job kind shares."""
from __future__ import annotations

import yaml

SPEC_FILE = "spec.yaml"


def dump_spec(spec) -> str:
    """The spec as YAML, every default filled in (written into run directories)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
