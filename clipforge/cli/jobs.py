"""Job commands of the `clipforge` command line: check and run specs, print their schema, run the demo.

  clipforge validate SPEC.yaml [field=value ...] check a spec without running it (--check: its paths too)
  clipforge run SPEC.yaml [field=value ...]     run a build/train/eval/sweep spec on a local (or RAY_ADDRESS) Ray
                                                (--dry-run: check paths, list outputs and plan, start nothing;
                                                --resume / --fresh: a train spec that changes a finished or
                                                cut-off run's spec continues it / trains into a new folder)
  clipforge schema KIND                         JSON Schema of a spec kind (for editor autocompletion)
  clipforge demo [--tiny]                       the whole loop on real offline data -> runs/demo/report.json
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from clipforge.cli.errors import fail
from clipforge.errors import EXIT_INVALID, SpecError

if TYPE_CHECKING:  # the train stack is imported only when a train spec runs
    from clipforge.train.rerun import RerunMode

DRY_RUN_HELP = ("Check the spec's paths without starting Ray or writing anything: inputs exist (local or "
                "s3://... with this environment's credentials), where outputs go, a sweep's children, a train "
                "spec's steps and samples. Every problem is one line naming the field and path; exit 1.")
RESUME_HELP = ("Train spec whose storage holds checkpoints trained under a different spec (another lr, model, "
               "data, ...): continue them under this spec; the change is recorded in the run's spec_history.jsonl. "
               "Without it (or --fresh) such a re-run is refused, listing the changed fields.")
FRESH_HELP = ("Train spec whose storage holds checkpoints: train from scratch into a new folder beside it "
              "(STORAGE-2, STORAGE-3, ...: the first free one, printed); the old run directory is kept as it is.")


def _rerun_mode(resume: bool, fresh: bool) -> RerunMode:
    if resume and fresh:
        fail("--resume and --fresh exclude each other: --resume continues the run's checkpoints, --fresh trains "
             "from scratch into a new folder", code=EXIT_INVALID)
    return "resume" if resume else "fresh" if fresh else "check"


def _dry_run(spec: Path, overrides: list[str]) -> None:
    from clipforge.cluster.dry_run import dry_run
    from clipforge.cluster.specs import load_spec

    dry_run(load_spec(spec, overrides), str(spec), typer.echo)


def validate(spec: Path = typer.Argument(..., help="Spec YAML file."),
             overrides: Optional[List[str]] = typer.Argument(None, help="field=value overrides."),
             check: bool = typer.Option(False, "--check", help=DRY_RUN_HELP)) -> None:
    """Check a spec (types, required fields, unknown fields) without running anything."""
    from clipforge.cluster.specs import load_spec

    if check:
        _dry_run(spec, overrides or [])
        return
    s = load_spec(spec, overrides or [])
    typer.echo(f"ok: {spec} is a valid `{s.kind}` spec")


def run(spec: Path = typer.Argument(..., help="Spec YAML file."),
        overrides: Optional[List[str]] = typer.Argument(None, help="field=value overrides, e.g. optim.lr=1e-4."),
        dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
        resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
        fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
        credentials_file: Optional[Path] = typer.Option(
            None, "--credentials-file", hidden=True,
            help="The object-store settings `clipforge submit` ships in a submitted job's working dir: set in this "
                 "process first; the job's worker setup hook sets them in every worker."),
        ) -> None:
    """Run a spec locally (joins RAY_ADDRESS or the spec's `ray.address` if set, else starts a local Ray)."""
    from clipforge.cluster.dispatch import run_job
    from clipforge.cluster.specs import load_spec

    rerun = _rerun_mode(resume, fresh)
    if credentials_file is not None:
        from clipforge.runtime.job_credentials import apply_credentials_file

        apply_credentials_file(credentials_file)
    if dry_run:
        _dry_run(spec, overrides or [])
        return
    s = load_spec(spec, overrides or [])
    result = run_job(s, rerun)
    # A train run that already held its whole budget (clipforge.train.rerun.AlreadyTrained): its one line is
    # logged and nothing else happened. Tested by attribute: importing the train stack here would slow every kind.
    if getattr(result, "nothing_trained", False):
        return
    if result is not None:
        typer.echo(json.dumps(result, indent=2, default=str)[:4000])


def schema(kind: str = typer.Argument(..., help="build | train | eval | sweep")) -> None:
    """Print the JSON Schema of a spec kind."""
    from clipforge.cluster.spec_kinds import KINDS

    if kind not in KINDS:
        raise SpecError(f"unknown kind {kind!r}; expected one of: {', '.join(KINDS)}")
    typer.echo(json.dumps(KINDS[kind].model_json_schema(), indent=2))


def demo(out: Path = typer.Option(Path("runs/demo"), help="Output folder (report.json, loss.png, runs)."),
         data_cache: Path = typer.Option(Path("data/cache"), help="Where the Debian packages are cached."),
         tiny: bool = typer.Option(False, help="A few-minute version on a small subset with the tiny model."),
         ) -> None:
    """Build shards -> train -> evaluate on real offline data; writes OUT/report.json."""
    from clipforge.demo.run import DemoOptions, run_demo

    report_path = run_demo(DemoOptions(out=out, data_cache=data_cache, tiny=tiny))
    typer.echo(f"report: {report_path}")


def register(app: typer.Typer) -> None:
    """Add `validate`, `run`, `schema` and `demo` to the clipforge command line."""
    for command in (validate, run, schema, demo):
        app.command()(command)
