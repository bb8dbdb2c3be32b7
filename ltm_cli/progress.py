"""Progress for the CLI's long commands (`ltm eval task=...`, `ltm bench model|kernels|parallel`, export, quantize).

Library functions report progress through a plain callback, `progress(done, total, label)`: `done` of `total` units
finished, `label` the one running now. `progress_bar(title, unit)` yields such a callback that draws one rich line
on stderr (stdout keeps the results only) and removes it when the work ends:

    with progress_bar("ltm eval task=passkey", "samples") as progress:
        results = evaluate_task(model, cfg, train_length, progress=progress)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Column

ProgressFn = Callable[[int, int, str], None]
console = Console(stderr=True)


@contextmanager
def progress_bar(title: str, unit: str = "", out: Optional[Console] = None) -> Iterator[ProgressFn]:
    """A one-line bar: `title ━━━━ 12/44 cells 0:01:02 0:03:40 length 4,096, depth 30 %` (the label is cut, never
    wrapped, on a narrow terminal). Yields the `progress(done, total, label)` callback."""
    bar = Progress(
        TextColumn(title, table_column=Column(no_wrap=True)),
        BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6)),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TextColumn(unit, table_column=Column(no_wrap=True)),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        TimeRemainingColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=3)),
        console=out or console, transient=True, expand=True)
    task = bar.add_task("", total=None)
    started = []

    def progress(done: int, total: int, label: str = "") -> None:
        if not started:  # drawn from the first report: an error found before any work leaves no bar (or blank line)
            bar.start()
            started.append(True)
        bar.update(task, completed=done, total=total, description=label, refresh=True)  # each call is news

    try:
        yield progress
    finally:
        if started:
            bar.stop()
