"""The `clipforge` command line: thin commands that validate input and always tear down what they start.

Each module registers its commands on one app: `jobs` (validate, run, schema, demo), `cluster` (submit,
jobs ..., render kuberay), `dashboard`, `export` (export, predict, export-report). Errors become messages
and exit codes in one place, `errors.CommandGroup`; `main` applies the entry-point environment defaults.
`clipforge --version` prints the installed package's version.
"""
from __future__ import annotations

import importlib.metadata
import logging
import sys

import typer

from clipforge.cli import build_manifest, cluster, dashboard, export, jobs, local_cluster_commands
from clipforge.cli.errors import CommandGroup
from clipforge.runtime.environment import apply_entry_point_defaults

app = typer.Typer(cls=CommandGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="clipforge: image-caption URL lists to trained and evaluated CLIP models.")


def installed_version() -> str:
    """clipforge's version from the installed package's metadata (the source's own when run uninstalled)."""
    try:
        return importlib.metadata.version("clipforge")
    except importlib.metadata.PackageNotFoundError:
        from clipforge import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"clipforge {installed_version()}")
        raise typer.Exit()


@app.callback()
def _top_level_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print clipforge's version and exit."),
) -> None:
    """clipforge: image-caption URL lists to trained and evaluated CLIP models."""


for _module in (jobs, cluster, dashboard, export, build_manifest, local_cluster_commands):
    _module.register(app)


def main(args: list[str] | None = None) -> None:
    """Run the command line on `args` (default: sys.argv[1:])."""
    apply_entry_point_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    app(args=args)


if __name__ == "__main__":
    main()
