"""`ltm train data=passkey` and `ltm eval task=...` as a user runs them (subprocess), on a tiny checkpoint. Each command
and script runs once as a subprocess; the further calls (error paths, the second checkpoint) go through the same
code in this process (the Typer app, the script's `main`), without the seconds of imports of a new interpreter."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import TINY, invoke, run_ltm

SHAPE = [o for o in TINY if not o.startswith("data.seq_len")] + ["data.seq_len=96", "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def passkey_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("passkey-run")
    result = invoke("train", "data=passkey", *SHAPE, f"output_dir={out}")  # the subprocess: test_cli.py
    assert result.returncode == 0, result.stderr[-2000:]
    assert "answer loss" in result.stdout
    # the printed `generate` command is prompted with the run's first validation sample up to its answer, and asks
    # for the answer's 5 digits, greedily (tests/test_task_prompts.py parses it back through bash)
    from omegaconf import OmegaConf

    from ltm_core import lit
    from ltm_core.config import DataConfig
    from ltm_core.console import generate_command
    from ltm_core.tasks.datamodule import TaskDataModule, task_config

    cfg = OmegaConf.load(out / "config.yaml")
    datamodule = TaskDataModule(DataConfig(**OmegaConf.to_container(cfg.data)), task_config(cfg),
                                int(cfg.model.segment_length))
    expected = generate_command(out / "checkpoints" / "last.ckpt", *lit._prompt_ids(None, datamodule))
    assert "The pass key is ' --max-new-tokens 5 --temperature 0" in expected, expected
    assert expected in result.stdout.replace("\n", ""), result.stdout
    return out / "checkpoints" / "last.ckpt"


def test_eval_task_json_schema_and_plot(passkey_ckpt, tmp_path):
    """No `task=`: a checkpoint trained on passkey is evaluated on passkey; the JSON records the `model.*`
    overrides the evaluation applied to the checkpoint's model."""
    out, image = tmp_path / "passkey.json", tmp_path / "passkey.png"
    plot = ["--plot", str(image)] if importlib.util.find_spec("matplotlib") else []
    result = run_ltm("eval", "--checkpoint", str(passkey_ckpt), "task.samples=2", "task.lengths=[96,400]",
                     "task.depth_bins=2", "model.kernels=torch", "--json", str(out), *plot)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ltm eval task=passkey" in result.stdout and "exact match" in result.stdout and "400" in result.stdout
    results = json.loads(out.read_text())
    assert results["task"] == "passkey" and results["train_length"] == 96 and results["lengths"] == [96, 400]
    assert results["checkpoint"] == str(passkey_ckpt) and results["memory"] is True
    assert results["model_overrides"] == ["model.kernels=torch"]
    rows = results["rows"]
    assert len(rows) == 2 * (2 + 2)  # per length: 2 depth bins, first segment, straddle
    for row in rows:
        assert {"length", "depth", "pairs", "samples", "exact_match", "digit_accuracy"} <= set(row)
        assert row["pairs"] is None and row["samples"] == 2 and 0 <= row["exact_match"] <= 1
        assert 0 <= row["depth"] <= 1
    assert [r["placement"] for r in rows[:4]] == ["depth", "depth", "first_segment", "straddle"]
    assert [r["length"] for r in rows] == [96] * 4 + [400] * 4
    if plot:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_task_errors_are_one_line(passkey_ckpt):
    result = invoke("eval", "--checkpoint", str(passkey_ckpt), "task=passkey", "task.filler=news")
    assert result.returncode == 2 and "task.filler" in result.stderr and "Traceback" not in result.stderr


def test_eval_of_a_task_checkpoint_on_text_with_data(passkey_ckpt, tmp_path):
    """`data=NAME` evaluates a checkpoint trained on a task on that text (the loss table, not the task grid), as the
    error for a task checkpoint's own data tells; `data=<a task>` is pointed at task=."""
    text = tmp_path / "text.txt"
    text.write_text("the lord said unto him, go in peace. " * 200)
    result = invoke("eval", "--checkpoint", str(passkey_ckpt), "data=textfile", f"data.path={text}",
                    "data.val_samples=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bits/byte" in result.stdout and "exact match" not in result.stdout
    result = invoke("eval", "--checkpoint", str(passkey_ckpt), "data=mqar")
    assert result.returncode == 2 and "evaluate it with task=mqar" in result.stderr


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in this process: its `main` under `__main__`, its exit status, stdout and stderr (the
    scripts set the thread count: restored after)."""
    out, err, threads, argv, code = io.StringIO(), io.StringIO(), torch.get_num_threads(), sys.argv, 0
    try:
        sys.argv = [str(script), *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([str(script), *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def delta_ckpt(tmp_path_factory):
    """A checkpoint with another memory kind than tokens (the diagnostics read the tokens memory)."""
    out = tmp_path_factory.mktemp("delta-run")
    train = invoke("train", "data=passkey", *SHAPE, "model/memory=delta", f"output_dir={out}")
    assert train.returncode == 0, train.stderr[-2000:]
    return out / "checkpoints" / "last.ckpt"


def test_passkey_importance_probe(passkey_ckpt, delta_ckpt, tmp_path):
    """scripts/passkey_importance_probe.py (docs/experiments/passkey.md) on a tokens-memory checkpoint: one line per length
    and layer, the filler's top importance never below its M-th; other checkpoints and missing files: exit 2."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "passkey_importance_probe.py"

    def probe(ckpt, run=run_script):
        return run(script, str(ckpt), "--lengths", "96", "200", "--samples", "3")

    result = probe(passkey_ckpt, run=lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True,
                                                               text=True, timeout=300))  # the script as a user runs it
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["length 96 layer 0", "length 200 layer 0"]
    for line in lines:
        key, top, mth, share = map(float, re.findall(r"(-?\d+\.\d+)", line))
        assert top >= mth and 0 <= share <= 1 and "of 3 samples" in line
    for bad, words in ((delta_ckpt, "memory.kind"), (tmp_path / "none.ckpt", "does not exist")):
        result = probe(bad)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_memory_contents_script(passkey_ckpt, delta_ckpt, tmp_path):
    """scripts/memory_contents.py (docs/experiments/passkey.md) on a tokens-memory checkpoint: per wrong answer, the key's
    digits held by each layer (x or .) and the memory's characters; the exact match per length, as `ltm eval`
    scores it; `model.*` overrides after the options; other checkpoints and missing files: exit 2."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "memory_contents.py"

    def contents(ckpt, *more, run=run_script):
        return run(script, str(ckpt), "--lengths", "96", "--samples", "2", *more)

    result = contents(passkey_ckpt, "model.memory.select_dedup=0.97",  # the script as a user runs it
                      run=lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True,
                                                    timeout=300))
    assert result.returncode == 0, result.stderr[-2000:]
    *wrong, summary = result.stdout.strip().splitlines()
    match = re.fullmatch(r"96: (\d+\.\d) % exact match \(24 samples\)", summary)  # 12 cells x 2 samples
    assert match, summary
    assert len(wrong) == round(24 * (1 - float(match.group(1)) / 100))  # one line per wrong answer
    for line in wrong:
        held = re.search(r"key digits held per layer \['([x.]{5})'\]; memory \['(.*)'\]$", line)
        assert line.startswith("96 ") and held, line
    evaluation = invoke("eval", "--checkpoint", str(passkey_ckpt), "task.samples=2", "task.lengths=[96]",
                        "model.memory.select_dedup=0.97", "--json", str(tmp_path / "eval.json"))
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert float(match.group(1)) == round(100 * sum(r["exact_match"] for r in rows) / len(rows), 1)
    for bad, words in ((delta_ckpt, "memory.kind"), (tmp_path / "none.ckpt", "does not exist")):
        result = contents(bad)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
