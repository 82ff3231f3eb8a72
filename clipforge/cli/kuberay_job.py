"""The entrypoint of a rendered KubeRay RayJob (`python -m clipforge.cli.kuberay_job`): the spec travels in
the job's environment (a RayJob cannot upload local files); write it to a file and `clipforge run` it."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from clipforge.cli import main
from clipforge.cluster.kuberay import SPEC_ENV


def run_spec_from_env(env_var: str = SPEC_ENV) -> None:
    """Run the spec carried in `env_var`, exactly as `clipforge run spec.yaml` runs a file."""
    text = os.environ.get(env_var)
    if not text:
        print(f"error: environment variable {env_var} is empty; this entrypoint runs inside a clipforge RayJob",
              file=sys.stderr)
        raise SystemExit(2)
    with tempfile.TemporaryDirectory(prefix="clipforge-job-") as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        main(["run", str(path)])


if __name__ == "__main__":
    run_spec_from_env()
