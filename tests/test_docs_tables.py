"""Every Markdown table the project ships (README.md, docs/, benchmarks/findings.md) has as many cells in its
delimiter row and in each body row as in its header. GitHub's Markdown drops a table whose delimiter row does not
match its header (the page then shows the raw pipes), and a body row's extra cells silently: a number pasted into
the wrong column would be read under another heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "findings.md", *sorted((ROOT / "docs").rglob("*.md"))]
DELIMITER = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")


def cells(line: str) -> int:
    """The cells of a table row: its unescaped pipes, less one (the row starts and ends with one)."""
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def table_errors(text: str) -> list[str]:
    """One line per table row whose cell count differs from its table's header (1-based line numbers)."""
    lines, errors = text.split("\n"), []
    for i, line in enumerate(lines[1:], start=1):
        if not (DELIMITER.match(line.strip()) and lines[i - 1].startswith("|")):
            continue
        width = cells(lines[i - 1])
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            if cells(lines[j]) != width:
                errors.append(f"line {j + 1}: {cells(lines[j])} cells under a header of {width}")
            j += 1
    return errors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_its_headers_cell_count(page):
    assert table_errors(page.read_text(encoding="utf-8")) == []


def test_the_check_finds_a_short_delimiter_and_a_long_row():
    table = "| a | b | c |\n|---|---:|\n| 1 | 2 | 3 |\n"
    assert table_errors(table) == ["line 2: 2 cells under a header of 3"]
    table = "| a | b |\n|---|---|\n| 1 | 2 | 3 |\n| `x\\|y` | 4 |\n"
    assert table_errors(table) == ["line 3: 3 cells under a header of 2"]
