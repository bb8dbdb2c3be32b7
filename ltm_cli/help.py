"""Help text read from the config tree (`conf/`, package `ltm_conf`): the groups and their options, so that
`ltm train --help` lists what exists today, not what existed when the help was written."""

from __future__ import annotations

import textwrap
from importlib import resources

import yaml


def config_groups() -> dict[str, tuple[list[str], str | None]]:
    """{group: (options, default)} in the order of conf/train.yaml's defaults list (then any other folder).
    default: the option train.yaml picks, None for a group that is off unless chosen (task, experiment)."""
    root = resources.files("ltm_conf")
    defaults: dict[str, str | None] = {}
    for entry in yaml.safe_load(root.joinpath("train.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            (key, value), = entry.items()
            if not key.startswith(("override ", "hydra")):
                defaults[key] = value
    groups = {}
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    for name in sorted(folders, key=lambda g: (list(defaults).index(g) if g in defaults else len(defaults), g)):
        folder = root.joinpath(name)
        options = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        if options:
            groups[name] = (options, defaults.get(name))
        for sub in sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            nested = sorted(p.name[:-5] for p in folder.joinpath(sub).iterdir() if p.name.endswith(".yaml"))
            if nested:  # e.g. model/memory: its default is the one the parent's default option picks
                groups[f"{name}/{sub}"] = (nested, _nested_default(folder, defaults.get(name), sub))
    return groups


def _nested_default(folder, option: str | None, sub: str) -> str | None:
    """The option of the nested group `sub` that the parent group's option file picks in its defaults list."""
    if option is None or not folder.joinpath(f"{option}.yaml").is_file():
        return None
    for entry in yaml.safe_load(folder.joinpath(f"{option}.yaml").read_text()).get("defaults", []) or []:
        if isinstance(entry, dict):
            (key, value), = entry.items()
            if key.split()[-1] == sub:
                return value
    return None


def groups_epilog(width: int = 78) -> str:
    """The groups as a help epilog: one line per group (wrapped under itself), the default marked."""
    groups = config_groups()
    pad = max(len(g) for g in groups) + 2
    lines = []
    for group, (options, default) in groups.items():
        names = ", ".join(f"{o} (default)" if o == default else o for o in options)
        if default is None:
            names += " (default: none)"
        body = textwrap.wrap(names, width=width - pad - 2, break_on_hyphens=False)
        lines.append(f"  {group.ljust(pad)}{body[0]}")
        lines += [" " * (pad + 2) + more for more in body[1:]]
    # "\b": click and Typer keep the block's line breaks instead of reflowing it
    return ("Config groups: pick an option with group=option (model=small), change one key with group.key=value "
            "(trainer.max_steps=100); `ltm config show \\[overrides]` prints the composed config.\n\n\b\n"
            + "\n".join(lines))
