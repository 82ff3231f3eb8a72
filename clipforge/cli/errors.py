"""The one place where errors become what a person at the terminal sees: a message line and an exit code.

Every `clipforge` command (and sub-command) runs inside `CommandGroup.invoke`, so commands only raise:
  - `UserError` and its subclasses: `error: <message>`, exit code of the class (see `clipforge.errors`);
  - errors of a storage library that reached a command without being named (botocore credentials or
    endpoint errors): one line saying so, exit 1 — the jobs name the field where they can
    (`clipforge.runtime.storage_errors`);
  - Ctrl-C: exit 130 without a traceback;
  - anything else is a bug: one `error:` line, then the traceback for the report, exit 70.
Help shows plain words for values (`SPEC`, `PATH`, `TEXT`) instead of typer's type tags: see `plain_help`.
"""
from __future__ import annotations

import sys
import traceback
from typing import NoReturn

import click
import typer
import typer.core

from clipforge.cli.plain_help import plain_commands, plain_params
from clipforge.errors import EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, UserError
from clipforge.runtime.storage_errors import storage_problem


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one `error:` line and leave with `code` (for option checks inside commands)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# Usage errors of typer's own copy of click (typer._click: a missing argument, a bad option value) derive from
# typer.TyperException, not from click's ClickException; typer versions without that class use click itself.
_TYPER_USAGE_ERRORS = getattr(typer, "TyperException", click.ClickException)


class CommandGroup(typer.core.TyperGroup):
    """Click group whose invocation turns every error into a message and an exit code (see module doc), and whose
    commands' help shows plain words."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain_commands(self.commands)

    def get_params(self, ctx) -> list:
        return plain_params(super().get_params(ctx))

    # typer ships its own copy of click (typer._click), whose Context its groups are handed; the type checker sees
    # that Context as unrelated to click's. (Errors of that copy are not click's either: see the except below.)
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)  # type: ignore[arg-type]
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, _TYPER_USAGE_ERRORS, typer.Exit,
                typer.Abort):
            raise  # an exit already decided (here or in a nested group), usage errors (exit 2), aborted prompts
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence: classify, never swallow
            problem = storage_problem(e, generic=False)
            if problem is not None:
                typer.echo(f"error: {problem}: {e}", err=True)
                raise typer.Exit(EXIT_FAILED) from None
            typer.echo(f"error: internal error (a bug in clipforge; please report it with the traceback below): "
                       f"{type(e).__name__}: {e}", err=True)
            traceback.print_exception(e, file=sys.stderr)
            raise typer.Exit(EXIT_INTERNAL) from None
