"""Progress for the CLI's long commands (`ltm eval task=...`, `ltm bench model|kernels|parallel`, export, quantize).

Library functions report progress through a plain callback, `progress(done, total, label)`: `done` of `total` units
finished, `label` the one running now. `progress_bar(title, unit)` yields such a callback that draws one rich line
on stderr (stdout keeps the results only) and removes it when the work ends:

    with progress_bar("ltm eval task=passkey", "samples") as progress:
        results = evaluate_task(model, cfg, train_length, progress=progress)

When stderr is not a terminal (a pipe, a CI log, `2>&1 | tee`), is a dumb one (TERM=dumb) or TTY_INTERACTIVE=0, a
bar cannot redraw itself in place: plain lines are written to stderr instead, sparsely, as native-parallel training
prints its steps (`PlainProgress`): one each time another tenth of the work is done, or when a while passed without
one (30 s, or a tenth of the time so far, whichever is longer), and one when the work ends; none before any work is
done, so an error found before the work starts is still the only line.

    task=passkey: 500/4,800 samples (10 %), 0:00:02 elapsed; now length 96, depth 0.55 (cell 6/48)
    task=passkey: 4,800/4,800 samples (100 %), 0:06:07 elapsed
"""

from __future__ import annotations

import os
import time
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
    wrapped, on a narrow terminal); off a terminal, sparse plain lines (`PlainProgress`). Yields the
    `progress(done, total, label)` callback."""
    screen = out or console
    if not interactive(screen):
        plain = PlainProgress(title, unit, screen)
        yield plain
        plain.finish()  # not after an error: its message is the last line
        return
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


def interactive(screen: Console) -> bool:
    """Whether a bar can redraw itself on `screen`: a terminal (rich's test: also FORCE_COLOR, TTY_COMPATIBLE=1) that
    is not dumb, unless TTY_INTERACTIVE=0|1 says otherwise (rich's own switch). Read now, not when `screen` was made:
    the module's console writes to whatever sys.stderr is at the time."""
    forced = os.environ.get("TTY_INTERACTIVE")
    if forced in ("0", "1"):
        return forced == "1"
    return screen.is_terminal and not screen.is_dumb_terminal


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """The `progress(done, total, label)` callback off a terminal: a line on `screen` (stderr) when another tenth of
    `total` is done, or when max(`every` s, a tenth of the elapsed time) passed since the last line, and (`finish`)
    one for the end; never one for done = 0. At most ~10 lines for the tenths plus ~10 per tenfold of run time past
    `every` * 10 s: a few dozen for minutes of work.

        task=passkey: 500/4,800 samples (10 %), 0:00:02 elapsed; now length 96, depth 0.55 (cell 6/48)
    """

    def __init__(self, title: str, unit: str, screen: Console, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.title, self.unit, self.screen, self.every, self.clock = title, unit, screen, every, clock
        self.start = clock()
        self.last_line = self.start
        self.tenth = 0  # tenths of the work done at the last line
        self.state: Optional[tuple[int, int]] = None  # the last report (done, total)
        self.printed: Optional[tuple[int, int]] = None  # the report of the last line

    def __call__(self, done: int, total: int, label: str = "") -> None:
        self.state = (done, total)
        if done <= 0:
            return
        now = self.clock()
        tenth = 10 * done // total if total > 0 else 0
        if tenth > self.tenth or now - self.last_line >= max(self.every, (now - self.start) / 10):
            self._line(done, total, label, now)

    def finish(self) -> None:
        """The closing line: the last report and the whole time (unless that report has its line already)."""
        if self.state is not None and self.state[0] > 0 and self.state != self.printed:
            self._line(*self.state, "", self.clock())

    def _line(self, done: int, total: int, label: str, now: float) -> None:
        self.tenth = 10 * done // total if total > 0 else 0
        self.last_line, self.printed = now, (done, total)
        share = f" ({100 * done // total} %)" if total > 0 else ""
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.title}: {done:,}/{total:,}{unit}{share}, {_clock(now - self.start)} elapsed"
        self.screen.print(text + (f"; now {label}" if label and done < total else ""), markup=False,
                          highlight=False, emoji=False, soft_wrap=True)
