"""Progress of the CLI's long commands off a terminal (`ltm eval task=passkey 2>&1 | tee log`, CI logs): sparse plain
lines on stderr instead of a bar that cannot redraw there (it printed nothing for minutes); on a terminal, the bar."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import ltm_cli.progress
from ltm_cli.progress import PlainProgress, progress_bar

from support import TINY

LINE = re.compile(r"^task=passkey: [\d,]+/[\d,]+ samples \(\d+ %\), \d+:\d\d:\d\d elapsed(; now length .*)?$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain(every: float = 30.0):
    screen, clock = io.StringIO(), Clock()
    progress = PlainProgress("task=passkey", "samples", Console(file=screen, width=60), every=every, clock=clock)
    return progress, screen, clock


def test_a_line_per_tenth_of_the_work_and_one_at_the_end():
    progress, screen, clock = plain()
    for done in range(0, 4800, 50):  # the default passkey grid: 4,800 samples in batches of 50, 3 minutes
        clock.now = done * 0.04
        progress(done, 4800, f"length {done:,}, depth 0.35 (cell {done // 100 + 1}/48)")
    clock.now = 200.0
    progress(4800, 4800, "")
    progress.finish()
    lines = screen.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert all(LINE.match(line) for line in lines), lines
    assert lines[0] == "task=passkey: 500/4,800 samples (10 %), 0:00:20 elapsed; now length 500, depth 0.35 (cell 6/48)"
    assert lines[-1] == "task=passkey: 4,800/4,800 samples (100 %), 0:03:20 elapsed"  # once, no label
    assert all(len(line) <= 100 for line in lines)  # never wrapped at the console's 60 columns
    assert screen.getvalue().count("\n") == len(lines)


def test_a_slow_stretch_prints_every_30_s_and_a_long_run_stays_sparse():
    progress, screen, clock = plain()
    progress(0, 1000, "first cell")
    clock.now = 100.0
    progress(0, 1000, "first cell")  # nothing done yet: no line (an early error stays the only line)
    assert screen.getvalue() == ""
    for done in range(1, 1000):  # the first tenth takes an hour: lines at max(30 s, a tenth of the time so far)
        clock.now = 100.0 + 36 * done
        progress(done, 1000, "a cell")
    progress.finish()
    lines = screen.getvalue().splitlines()
    assert 10 < len(lines) <= 60, len(lines)  # ten hours: a few dozen lines, not one per report
    assert lines[0].startswith("task=passkey: 1/1,000 samples (0 %), 0:02:16 elapsed")
    assert lines[-1].startswith("task=passkey: 999/1,000 samples (99 %), 10:01:04 elapsed")


def test_the_bar_on_a_terminal_plain_lines_otherwise(monkeypatch):
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    terminal = io.StringIO()
    with progress_bar("task=passkey", "samples", out=Console(file=terminal, force_terminal=True, width=100)) as p:
        assert not isinstance(p, PlainProgress)
        p(1, 2, "length 96")
    assert "\x1b[" in terminal.getvalue() and "1/2" in ANSI.sub("", terminal.getvalue())  # drawn, then removed
    for console, env in ((Console(file=io.StringIO(), width=100), {}),  # a pipe or a file
                         (Console(file=io.StringIO(), force_terminal=True, width=100), {"TERM": "dumb"}),
                         (Console(file=io.StringIO(), force_terminal=True, width=100), {"TTY_INTERACTIVE": "0"})):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with progress_bar("task=passkey", "samples", out=console) as p:
            p(0, 2, "length 96")
            p(2, 2, "")
        assert console.file.getvalue() == "task=passkey: 2/2 samples (100 %), 0:00:00 elapsed\n", env
        for key in env:
            monkeypatch.delenv(key)


def test_no_closing_line_after_an_error():
    console = Console(file=io.StringIO(), width=100)
    with pytest.raises(ValueError):
        with progress_bar("task=passkey", "samples", out=console) as p:
            p(0, 10, "length 96")
            raise ValueError("bad sample")
    assert console.file.getvalue() == ""


@pytest.fixture(scope="module")
def passkey_checkpoint(tmp_path_factory) -> Path:
    """A 2-step passkey run (a second or two in this process)."""
    from ltm_core.configuration import compose
    from ltm_core.train import train

    out = tmp_path_factory.mktemp("passkey") / "run"
    shape = [o for o in TINY if not o.startswith("data.seq_len")] + ["data.seq_len=96", "trainer.max_steps=2"]
    return train(compose(["data=passkey", *shape, f"output_dir={out}"]))


GRID = ["task=passkey", "task.lengths=[96,192]", "task.samples=4", "task.batch_size=1", "task.depth_bins=2",
        "task.placement_checks=false"]  # 16 samples, one report each


def test_ltm_eval_task_piped_prints_progress_lines_on_stderr_only(passkey_checkpoint):
    """`ltm eval task=passkey | tee`: its stderr a pipe too (a real one: the installed command, a few seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    exe = Path(sys.executable).with_name("ltm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ltm_cli"]
    result = subprocess.run([*cmd, "eval", "--checkpoint", str(passkey_checkpoint), *GRID, "model.kernels=torch"],
                            capture_output=True, text=True, timeout=300, env={**env, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert 5 <= len(lines) <= 11 and all(LINE.match(ln) for ln in lines), result.stderr
    assert "now length 96, depth 0.25 (cell 1/4)" in result.stderr or "(cell 2/4)" in result.stderr, result.stderr
    assert lines[-1].startswith("task=passkey: 16/16 samples (100 %), ") and "now" not in lines[-1]
    assert "\x1b[" not in result.stderr  # no bar's control codes in the log
    assert "samples (" not in result.stdout and "exact match" in result.stdout  # stdout: the table alone


def test_ltm_eval_task_on_a_terminal_still_draws_the_bar(passkey_checkpoint, monkeypatch):
    from typer.testing import CliRunner

    from ltm_cli.app import app

    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    screen = io.StringIO()
    monkeypatch.setattr(ltm_cli.progress, "console", Console(file=screen, force_terminal=True, width=120))
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(passkey_checkpoint), *GRID])
    assert result.exit_code == 0, result.output
    assert "\x1b[" in screen.getvalue() and "elapsed" not in screen.getvalue()  # the rich bar, not the lines
    assert "16/16" in ANSI.sub("", screen.getvalue()) and "elapsed" not in result.stderr
    # CliRunner's stderr is no terminal: without the terminal console, the plain lines go there, not to stdout
    monkeypatch.setattr(ltm_cli.progress, "console", Console(stderr=True))
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(passkey_checkpoint), *GRID])
    assert result.exit_code == 0, result.output
    assert "16/16 samples (100 %)" in result.stderr and "elapsed" not in result.stdout
