"""CI runs the README's set-up commands as a new user does: in a fresh virtualenv, not the system interpreter."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    """The shell commands inside code blocks of the README's set-up section."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Set-up\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section, "README.md has no '## Set-up' section"
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", section.group(1), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_setup_in_a_fresh_venv():
    commands = readme_setup_commands()
    assert any(c.startswith("pip install -e . ") for c in commands), commands  # the run
    assert any(c.startswith("pip install -e \".[test]\"") for c in commands), commands  # the tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    venv = next(i for i, line in enumerate(ci) if re.match(r"python3? -m venv ", line))
    activate = next(i for i, line in enumerate(ci) if re.match(r"(\.|source) .*/bin/activate", line))
    for command in commands:  # each README command, verbatim (`ltm train` may take shortening overrides)
        at = next((i for i, line in enumerate(ci) if line == command or line.startswith(command + " ")), None)
        assert at is not None, f".ci/run does not run the README's `{command}`"
        assert venv < activate < at, f".ci/run runs `{command}` outside the fresh venv"
