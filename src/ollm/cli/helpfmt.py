"""Help pages that read like a Unix tool's: ``--model TEXT``, not ``--model <str>``.

typer renders every parameter's Python type as a ``<str>`` / ``<bool>`` tag. ``OllmGroup`` (the
app's group class) gives each parameter without a metavar a plain one when a command is looked
up or the root help is drawn: nothing for flags, the click type's name (TEXT, INTEGER, FLOAT,
PATH; choices keep ``a|b|c``) for values, the upper-cased name for arguments. Sub-apps and commands other modules add
are covered too, so no option needs its own metavar.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperGroup

__all__ = ["OllmGroup", "tidy_command"]


# Python type names (typer's ``bare_type``) -> the words click's help traditionally shows.
_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH"}


def _no_type(ctx: Any) -> None:
    return None


def _tidy_param(param: Any) -> None:
    if getattr(param, "param_type_name", "") == "argument":
        if param.metavar is None:
            param.metavar = str(param.name).upper()
        # typer draws an argument's Python type whatever its metavar; the name says enough.
        param.display_type_rich = _no_type
        return
    if getattr(param, "metavar", None) is not None:
        return
    desc = getattr(param, "type_descriptor", None)
    if getattr(param, "is_flag", False):
        param.metavar = ""  # a flag takes no value: show none
    elif desc is not None and not desc.is_choice:  # choices keep typer's a|b|c
        bare = param.bare_type()
        inner = bare.removeprefix("list[").removesuffix("]")
        param.metavar = _WORDS.get(inner, inner.upper())


def tidy_command(command: Any, ctx: Any) -> None:
    """Give ``command``'s parameters (its help option too) and its sub-commands' plain metavars."""
    for param in command.get_params(ctx):
        _tidy_param(param)
    for sub in getattr(command, "commands", {}).values():
        tidy_command(sub, ctx)


class OllmGroup(TyperGroup):
    """The root group: tidies parameters before typer draws or parses them."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            _tidy_param(param)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            tidy_command(command, ctx)
        return command
