"""`--help` in plain words: `SPEC`, `PATH`, `TEXT`, `N` where typer prints its type tags (`<path>`,
`<list[str]>`, `<bool>` on every flag).

typer builds each command's parameters itself (`typer.core.TyperArgument` / `TyperOption`) and renders their
value column from the Python annotation, with no setting to turn that off; an explicit `metavar` replaces
it for options only. So `CommandGroup` hands every parameter of every command to `plain_params`, which
re-types it as the subclass below of its own class: same object, same parsing, only the help text differs.
"""
from __future__ import annotations

from typing import Any, get_args, get_origin

import typer.core

# Python annotation -> the word help shows for its value (click's own words, and N for counts).
_WORDS: dict[type, str] = {str: "TEXT", int: "N", float: "NUMBER"}


def _element_type(annotation: Any) -> Any:
    """`list[X]` / `Optional[list[X]]` -> X; anything else as it is."""
    if get_origin(annotation) is list and get_args(annotation):
        return get_args(annotation)[0]
    return annotation


def value_word(param: Any) -> str | None:
    """The plain word for what a parameter takes (None: a flag, which takes nothing)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        return None
    choices = getattr(descriptor, "choices", None)
    if choices:
        return "|".join(str(getattr(c, "value", c)) for c in choices)
    if getattr(descriptor, "is_path", False):
        return "PATH"
    annotation = _element_type(descriptor.annotation)
    for python_type, word in _WORDS.items():
        if isinstance(annotation, type) and issubclass(annotation, python_type):
            return word
    return "VALUE"


class PlainArgument(typer.core.TyperArgument):
    """An argument shown by its name in capitals (`SPEC`, `OVERRIDES...`) and the word for its values."""

    @property
    def display_name_raw(self) -> str:
        return self.metavar or self.name.upper()

    def display_type_rich(self, ctx) -> str | None:
        return value_word(self)

    def _usage_display_name(self) -> str:
        # click's usage convention: required arguments bare, optional ones in brackets.
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


class PlainOption(typer.core.TyperOption):
    """An option shown with the word for its value (`--runs TEXT`), and nothing after a flag."""

    def display_type_rich(self, ctx) -> str | None:
        if self.metavar is not None:
            return self.metavar
        return value_word(self)


_PLAIN: dict[type, type] = {typer.core.TyperArgument: PlainArgument, typer.core.TyperOption: PlainOption}


def plain_params(params: list) -> list:
    """`params` with every typer argument and option shown in plain words (re-typed in place; see module doc)."""
    for param in params:
        plain = _PLAIN.get(type(param))
        if plain is not None:
            param.__class__ = plain
    return params


class PlainHelpCommand(typer.core.TyperCommand):
    """A command whose help, `--help` itself included, shows plain words (see module doc)."""

    def get_params(self, ctx) -> list:
        return plain_params(super().get_params(ctx))


def plain_commands(commands: dict) -> None:
    """Every plain typer command among `commands` shows plain words in its help (groups do so themselves)."""
    for command in commands.values():
        if type(command) is typer.core.TyperCommand:
            command.__class__ = PlainHelpCommand
