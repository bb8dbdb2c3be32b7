"""The `generate` line printed after a task run (`ltm train data=passkey|mqar|babi_facts`): prompted with the first
validation sample up to where its answer starts, `--max-new-tokens` the answer's length, greedy, and quoted so that
bash hands `ltm generate` exactly the sample's bytes. Text runs keep their first-words line (tests/test_console.py)."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from ltm_core import lit
from ltm_core.config import DataConfig
from ltm_core.configuration import compose, to_dict
from ltm_core.console import generate_command, shell_quote, task_prompt, typable
from ltm_core.tasks import get_task
from ltm_core.tasks.common import VALIDATION_STREAM, sample_rng
from ltm_core.tasks.datamodule import TaskDataModule, task_config
from ltm_core.tokenizer import BOS, EOS

from support import TINY

BASE = [o for o in TINY if not o.startswith("data.seq_len")] + ["trainer.max_steps=2"]
SHAPES = {  # the smallest settings each task's samples fit in, at TINY's segments of 16
    "passkey": ["data.seq_len=96"],
    "mqar": ["data.seq_len=96", "task.train_pairs=4", "task.key_length=1"],
    "babi_facts": ["data.seq_len=256"],
}


def bash_words(line: str) -> list[bytes]:
    """The arguments bash passes to `ltm` for a printed `generate:   ltm ...` line, as bytes."""
    assert line.startswith("generate:   ltm generate "), line
    script = "ltm() { printf '%s\\0' \"$@\"; }; " + line[len("generate:   "):]
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, timeout=30).stdout
    return out.split(b"\0")[:-1]


def options(words: list[bytes]) -> dict[str, bytes]:
    assert words[0] == b"generate" and len(words) % 2 == 1, words
    return {words[i].decode(): words[i + 1] for i in range(1, len(words), 2)}


def first_validation_sample(task: str, overrides: list[str]):
    """Validation sample 0 of a `data=<task>` run, made here from the task's generator (not from the labels)."""
    cfg = compose([f"data={task}", *BASE, *overrides])
    task_cfg = task_config(cfg)
    segment = task_cfg.layout(int(cfg.model.segment_length))
    sample = get_task(task).train_sample(sample_rng(int(cfg.data.seed), VALIDATION_STREAM, 0),
                                         int(cfg.data.seq_len) + 1, task_cfg, segment, "eval")
    return cfg, sample


def printed_line(cfg) -> str:
    """The line `fit_lightning` prints for this run's data (same two calls)."""
    datamodule = TaskDataModule(DataConfig(**to_dict(cfg.data)), task_config(cfg), int(cfg.model.segment_length))
    return generate_command(Path("runs/a b/checkpoints/last.ckpt"), *lit._prompt_ids(None, datamodule))


@pytest.mark.parametrize("task", list(SHAPES))
def test_the_printed_command_prompts_with_the_sample_before_its_answer(task):
    cfg, sample = first_validation_sample(task, SHAPES[task])
    start, end = sample.targets[0]  # the first scored span (mqar: the first query's value)
    line = printed_line(cfg)
    given = options(bash_words(line))
    assert given["--checkpoint"] == b"runs/a b/checkpoints/last.ckpt"
    assert given["--prompt"] == bytes(sample.tokens[1:start].tolist())  # `ltm generate` puts the BOS in front
    assert int(given["--max-new-tokens"]) == end - start and float(given["--temperature"]) == 0  # greedy
    assert "\n" not in line  # one line; the prompt's newlines are escaped
    prompt = given["--prompt"].decode()
    if task == "passkey":
        assert prompt.endswith("The pass key is ") and end - start == 5 and sample.answer in prompt  # the needle
    elif task == "babi_facts":
        assert prompt.endswith(f"{sample.info['name']} is in the ") and end - start == len(sample.answer)
    else:
        assert end - start == 1 and prompt[-1] in prompt[:sample.info["pairs_end"]]  # a queried key


def test_lm_loss_runs_print_the_same_line():
    """task.lm_loss=true trains on every next byte, but validation labels (and so the prompt) are the answer's."""
    cfg, _ = first_validation_sample("passkey", SHAPES["passkey"])
    lm = compose(["data=passkey", *BASE, *SHAPES["passkey"], "task.lm_loss=true"])
    assert printed_line(lm) == printed_line(cfg) and "--max-new-tokens 5 " in printed_line(lm)


def test_task_prompt_reads_the_answer_from_shifted_labels():
    """labels[j] is the token after input j: the answer starting at token p has labels from p - 1 on."""
    tokens = [BOS, *b"Q? ", *b"42", *b"."]
    inputs, labels = tokens[:-1], [-100, -100, -100, ord("4"), ord("2")]
    assert task_prompt(inputs, labels) == ([BOS, *b"Q? "], 2)
    assert task_prompt(inputs, [-100] * 5) is None
    assert task_prompt([BOS, 1, 2, 3, 4, 5], [-100, 9, -100, -100, 8, 8]) == ([BOS, 1], 1)  # the first span only


def test_special_tokens_and_nul_cannot_be_typed():
    assert typable([BOS, *b"abc"]) == b"abc"
    assert typable([BOS, *b"old", EOS, BOS, *b"new"]) == b"new"
    assert typable([*b"a", 0, *b"b"]) == b"b"


AWKWARD = [b"plain words", b"", b"it's", b"a\nb", b"tab\there", b"back\\slash \\n", b"q'uo\"te $HOME `x` !! *",
           "ünïcödé".encode(), b"\xff\xfe invalid", b"\x01A\x1bB\x7fC", b"\x1f0f"]  # \x1f then hex digits


@pytest.mark.parametrize("data", AWKWARD)
def test_shell_quote_is_one_bash_word_of_exactly_those_bytes(data):
    quoted = shell_quote(data)
    assert all(0x20 <= ord(c) < 0x7F for c in quoted), quoted  # printable ASCII: copy-paste safe
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {quoted}"], capture_output=True, check=True).stdout
    assert out == data + b"\0"
    if all(0x20 <= b < 0x7F for b in data):
        assert quoted == shlex.quote(data.decode())  # printable text: quoted as before


@pytest.mark.parametrize("task", list(SHAPES))
def test_a_tiny_task_run_prints_a_line_ltm_generate_runs(task, tmp_path, monkeypatch):
    """End to end: the line a 2-step run prints (through the run's console), parsed by bash, run by `ltm generate`
    (in this process), shows the prompt and then the answer's length of greedy tokens."""
    from typer.testing import CliRunner

    from ltm_cli.app import app
    from ltm_core.train import train

    screen = io.StringIO()
    monkeypatch.setattr(lit, "console", Console(file=screen, width=80, color_system=None))
    cfg, sample = first_validation_sample(task, SHAPES[task])
    cfg.output_dir = str(tmp_path / "run with 'quotes'")
    train(cfg)
    lines = [ln for ln in screen.getvalue().splitlines() if ln.startswith("generate:")]
    assert len(lines) == 1, screen.getvalue()
    words = bash_words(lines[0])
    given = options(words)
    start, end = sample.targets[0]
    assert given["--prompt"] == bytes(sample.tokens[1:start].tolist())
    assert given["--checkpoint"] == str(tmp_path / "run with 'quotes'" / "checkpoints" / "last.ckpt").encode()
    args = [os.fsdecode(w) for w in words]  # as Python reads a command line
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(given["--prompt"].decode()), result.stdout
    again = CliRunner().invoke(app, args)
    assert again.stdout == result.stdout  # --temperature 0: the same answer every time
    if task == "passkey":  # once, the line as pasted into bash, run by the installed `ltm` (seconds of imports)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONWARNINGS": "ignore"}
        pasted = subprocess.run(["bash", "-c", lines[0][len("generate:   "):]], capture_output=True, env=env,
                                timeout=120)
        assert pasted.returncode == 0, pasted.stderr[-2000:]
        assert pasted.stdout.decode() == result.stdout
