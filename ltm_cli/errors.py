"""One-line errors for the CLI: an LtmError (or a ValueError from bad arguments) prints one line, exit code 2.
Options every command shares (`--device`, `--json` / `--plot` files) are checked here, before any work."""

from __future__ import annotations

import os
from functools import wraps
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ltm_core.errors import ConfigError, Interrupted, LtmError

err_console = Console(stderr=True)
settings = {"debug": False}  # set by `ltm --debug`


def report(err: Exception) -> None:
    prefix = "" if isinstance(err, Interrupted) else "[red]error:[/] "  # an interrupted run is no error: it saved
    err_console.print(f"{prefix}{escape(str(err))}", highlight=False, soft_wrap=True)


def usage_errors_in_one_line() -> None:
    """click's usage errors (an unknown command or option, an option value outside its range, an extra argument)
    print one line, `error: ...`, exit code 2, as every other bad input does; typer draws a usage line, a hint and a
    box (`typer.rich_utils.rich_format_error`, which typer looks up when it reports one). A bare `ltm` still shows
    the help."""
    from typer import rich_utils

    boxed = rich_utils.rich_format_error
    if getattr(boxed, "one_line", False):
        return

    def one_line(exc) -> None:
        if type(exc).__name__ == "NoArgsIsHelpError":
            return boxed(exc)
        err_console.print(f"[red]error:[/] {escape(exc.format_message())}", highlight=False, soft_wrap=True)

    one_line.one_line = True
    rich_utils.rich_format_error = one_line


def user_errors(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (LtmError, ValueError) as err:
            if settings["debug"]:
                raise
            report(err)
            raise typer.Exit(getattr(err, "exit_code", 2)) from None

    return wrapper


def device_option(name: Optional[str]) -> str:
    """`--device`: auto (or not given) -> cuda when available, else cpu; cpu; cuda[:N], which must be available."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and name.split(":")[0] != "cuda":
        raise ConfigError("--device", f"must be auto, cpu or cuda (cuda:N), got {name!r}")
    if name != "cpu" and not torch.cuda.is_available():
        raise ConfigError("--device", f"{name}: no CUDA device here (torch.cuda.is_available() is False)")
    return name


def check_overrides(overrides: list[str], groups: tuple[str, ...], command: str) -> None:
    """The extra arguments of a command that takes Hydra-style overrides of some config groups only: each is a
    `key=value` whose key is in `groups` (a misspelt option, a stray word or another group's key is one line, not
    silently ignored); their values are checked where they are read."""
    for arg in overrides:
        if arg.startswith("-"):
            raise ConfigError(arg, f"no such option (`ltm {command} --help` lists them)")
        from ltm_core.configuration import override_key

        key = override_key(arg)
        if "=" not in arg:
            raise ConfigError(arg, "is not an override: overrides are key=value")
        if key.split(".")[0] not in groups:
            raise ConfigError(key, f"ltm {command} takes {', '.join(g + '.*' for g in groups)} overrides only")


def file_name(value: str) -> Path:
    """The parser of `--json` / `--plot` values: a name that ends in a slash names a folder (the Path it would
    become has lost the slash, and a file of that name would be written), a usage error in one line."""
    if value.endswith(("/", os.sep)):
        raise typer.BadParameter(f"{value} names a folder: give a file name")
    return Path(value)


def output_file(path: Optional[Path], option: str) -> Optional[Path]:
    """A `--json` / `--plot` destination, checked before the work that fills it: a folder given as the file, or a
    folder that cannot be written or made, is a one-line error (`--plot`: also matplotlib and the file format).
    Nothing is made yet: the writer makes the folder (`write_json`; the plots' savefig)."""
    from ltm_core.run_guard import writable_folder

    if path is None:
        return None
    if path.is_dir():
        raise ConfigError(option, f"{path} is a folder: give a file name")
    writable_folder(path.parent, option)
    if option == "--plot":
        from ltm_core.plotting import check_plot_path

        check_plot_path(path)
    return path


def write_json(path: Path, payload) -> None:
    """A `--json` file (checked by `output_file`), its folder made now."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
