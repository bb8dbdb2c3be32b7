"""Helpers shared by the tests: tiny configs and a runner for the `ltm` console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from ltm_core import TitanConfig, TitanModel

# Tiny settings for CLI runs: a few seconds each on 2 CPU cores.
TINY = ["model.hidden_size=32", "model.num_attention_heads=2", "model.num_hidden_layers=1", "model.memory_slots=8",
        "model.memory_dim=16", "model.segment_length=16", "data.seq_len=64", "data.batch_size=2",
        "data.val_samples=4", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1", "trainer.progress=false",
        "trainer.accelerator=cpu"]


def tiny_model(cfg: TitanConfig, seed: int = 0) -> TitanModel:
    torch.manual_seed(seed)
    return TitanModel(cfg)


def run_ltm(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `ltm ARGS` as a user would (the console script of this interpreter's environment)."""
    exe = Path(sys.executable).with_name("ltm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ltm_cli"]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def invoke(*args: str):
    """`ltm ARGS` in this process (typer's runner): the CLI's code path without a new interpreter's imports."""
    from typer.testing import CliRunner

    from ltm_cli.app import app

    result = CliRunner().invoke(app, list(args))
    result.returncode = result.exit_code
    return result


def one_error_line(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
