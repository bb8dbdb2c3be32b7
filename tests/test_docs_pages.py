"""The Markdown pages the project ships (README.md and docs/; benchmarks/findings.md is checked as the part of
docs/benchmarks.md that `benchmarks/render.py` copies it into) as GitHub shows them:

- every table has as many cells in its delimiter row and in each body row as in its header. GitHub drops a table
  whose delimiter row does not match its header (the page then shows the raw pipes), and a body row's extra cells
  silently: a number pasted into the wrong column would be read under another heading;
- every relative link names a file that exists, and its #anchor a heading (GitHub's slug: lower case, punctuation
  dropped, spaces to hyphens, -1, -2 for repeats) or an `<a id>` of that page. Links inside code blocks are not
  links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
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


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a page defines: its headings' slugs (a repeated one numbered) and its `<a id="...">` tags."""
    found, seen = set(re.findall(r'<a id="([^"]+)"', text)), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        s = slug(heading)
        found.add(f"{s}-{seen[s]}" if s in seen else s)
        seen[s] = seen.get(s, 0) + 1
    return found


def link_errors(page: Path, text: str) -> list[str]:
    """One line per relative link of `text` (the page at `page`) whose file or anchor does not exist."""
    errors = []
    for link in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"^[a-z]+:", link):  # http(s):, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            errors.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            errors.append(f"{link}: no such anchor")
    return errors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_its_file_and_anchor(page):
    assert link_errors(page, page.read_text(encoding="utf-8")) == []


def test_the_link_check_finds_a_missing_file_and_anchor():
    readme = ROOT / "README.md"
    text = ("[a](docs/benchmarks.md#cpu) [b](docs/nothing.md) [c](docs/benchmarks.md#nothing-here) "
            "[d](https://example.com/x) ```\n[e](nowhere.md)\n```")
    assert link_errors(readme, text) == ["docs/nothing.md: no such file",
                                         "docs/benchmarks.md#nothing-here: no such anchor"]
    assert slug("`model=small`: 32, 64 or 256 kept tokens per layer") == "modelsmall-32-64-or-256-kept-tokens-per-layer"
