"""One-line errors for the CLI: an LtmError (or a ValueError from bad arguments) prints one line, exit code 2."""

from __future__ import annotations

from functools import wraps

import typer
from rich.console import Console
from rich.markup import escape

from ltm_core.errors import LtmError

err_console = Console(stderr=True)
settings = {"debug": False}  # set by `ltm --debug`


def report(err: Exception) -> None:
    err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)


def user_errors(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (LtmError, ValueError) as err:
            if settings["debug"]:
                raise
            report(err)
            raise typer.Exit(2) from None

    return wrapper
