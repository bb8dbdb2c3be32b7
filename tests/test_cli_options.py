"""Options every command shares, checked before any work: `--device`, `--json` / `--plot` files; the checkpoint
path's errors; rich's page width when the output is a file or a pipe."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ltm_cli.app import app
from ltm_cli.errors import device_option, output_file, write_json
from ltm_core.checkpoint import read_checkpoint
from ltm_core.errors import CheckpointError, ConfigError, LtmError

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_device_option():
    assert device_option(None) == device_option("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_option("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device: must be auto, cpu or cuda.*'tpu'"):
        device_option("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda:1: no CUDA device here"):
            device_option("cuda:1")


def test_output_file_checks_its_folder_and_the_writer_makes_it(tmp_path):
    """`output_file` checks, before the work, that the file's folder can be made, and leaves nothing behind (a
    command that then fails on its input has written nothing); `write_json` makes it when the results exist."""
    nested = tmp_path / "a" / "b" / "r.json"
    assert output_file(nested, "--json") == nested and not (tmp_path / "a").exists()
    write_json(nested, {"x": 1})
    assert json.loads(nested.read_text()) == {"x": 1}
    with pytest.raises(ConfigError, match="--json: .* is a folder: give a file name"):
        output_file(tmp_path, "--json")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--json: .*file is a file, not a folder"):
        output_file(blocker / "r.json", "--json")
    with pytest.raises(ConfigError, match="--json: cannot create"):
        output_file(blocker / "x" / "r.json", "--json")
    assert output_file(None, "--json") is None


@pytest.mark.parametrize("command", [["eval", "-c", "x.ckpt", "--json"], ["eval", "-c", "x.ckpt", "--plot"],
                                     ["bench", "model", "--json"], ["bench", "model", "--plot"],
                                     ["bench", "kernels", "--json"], ["bench", "parallel", "--json"],
                                     ["quantize", "-c", "x.ckpt", "-m", "bnb.int8", "-o", "q", "--json"]])
def test_a_file_option_ending_in_a_slash_is_refused(tmp_path, monkeypatch, command):
    """`--json out/` named a folder that does not exist yet: the Path lost the slash and the command wrote a file
    `out`. Every --json / --plot refuses it in one line, exit 2, before any work."""
    from typer.testing import CliRunner

    from ltm_cli.app import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "out/"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "out/ names a folder: give a file name" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="the plot extra is not installed")
def test_output_file_checks_the_plot_format(tmp_path):
    assert output_file(tmp_path / "p.png", "--plot") == tmp_path / "p.png"
    output_file(tmp_path / "p.SVG", "--plot")
    with pytest.raises(ConfigError, match=r"--plot: .*p\.txt: the file name must end in one of .*\.png"):
        output_file(tmp_path / "p.txt", "--plot")


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--checkpoint", "{tmp}/missing.ckpt", "--json", "{tmp}"], "--json"),
    (["eval", "--checkpoint", "{tmp}/missing.ckpt", "--device", "tpu"], "--device"),
    (["generate", "--checkpoint", "{tmp}/missing.ckpt", "--device", "gpu0"], "--device"),
    (["bench", "kernels", "--device", "tpu"], "--device"),
    (["bench", "model", "--json", "{tmp}"], "--json"),
    (["bench", "parallel", "--json", "{tmp}"], "--json"),
    (["bench", "model", "--context", "0"], "--context: must be positive, got 0"),
    (["bench", "model", "--context", "1024", "--context", "-8"], "--context: must be positive, got -8"),
    (["bench", "model", "--gen", "0"], "--gen"),
    (["bench", "model", "--batch-size", "0"], "--batch-size"),
    (["bench", "model", "--repeats", "0"], "--repeats"),
    (["bench", "model", "--warmup", "-1"], "--warmup: must be at least 0"),
    (["bench", "kernels", "--dtype", "int8"], "--dtype"),
    (["bench", "parallel", "--steps", "0"], "--steps"),
    (["bench", "parallel", "--preset", "tp2", "--preset", "tp3"], "parallel: no option 'tp3'"),
    (["generate", "--checkpoint", "{tmp}/missing.ckpt", "--top-k", "0"], "Invalid value for '--top-k'"),
    (["generate", "--checkpoint", "{tmp}/missing.ckpt", "model.a=1"], "unexpected extra argument"),
    (["nosuch"], "No such command 'nosuch'"),
] + ([(["eval", "--checkpoint", "{tmp}/missing.ckpt", "--plot", "{tmp}/p.txt"], "--plot"),
      (["bench", "model", "--plot", "{tmp}/p.txt"], "--plot")] if HAS_MATPLOTLIB else []))
def test_commands_check_their_options_before_any_work(tmp_path, argv, needle):
    """Each command fails in one line, exit 2, on a bad option before it reads a checkpoint or measures anything
    (the checkpoints named here do not exist: the error is the option's)."""
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in argv])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "does not exist" not in result.output, result.output
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) == 1, result.output


def test_checkpoint_path_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder: give the .ckpt file .*last.ckpt"):
        read_checkpoint(tmp_path)
    pickled = tmp_path / "object.ckpt"
    torch.save({"state_dict": {}, "thing": LtmError("not a tensor")}, pickled)  # weights_only refuses classes
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(pickled)
    message = str(err.value)  # one line that names the refused class, without running it
    assert "would run code (ltm_core.errors.LtmError)" in message and "\n" not in message, message
    assert len(message) < 300, message
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02 not a checkpoint at all")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(garbage)
    message = str(err.value)
    assert "not a readable checkpoint (" in message and message.endswith(")") and len(message) < 300, message
    reason = message.split("not a readable checkpoint (", 1)[1][:-1]
    assert reason and ". " not in reason, reason  # the first sentence of torch's message only


def test_tables_are_not_cut_at_80_columns_in_files_and_pipes():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    probe = "import os, ltm_cli; print(os.environ['COLUMNS'])"
    piped = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert piped.stdout.strip() == "160"
    chosen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={**env, "COLUMNS": "100"})
    assert chosen.stdout.strip() == "100"


TYPOS = [["train", "model=tinyy"], ["train", "data=passkey", "task.samples=0"],
         ["train", "parallel=tp2", "model.num_attention_heads=3"], ["train", "-m", "model.segment_length=16,0"],
         ["config", "show", "model=tinyy"], ["bench", "model", "--context", "0"]]


def test_config_errors_answer_before_torch_loads():
    """A typo answers in about a second (`time ltm train model=tinyy`: docs/cli.md), because the config is composed
    and validated before torch and Lightning load (4-11 s): in a fresh interpreter every command below fails in
    one line, exit 2, and neither module was imported."""
    code = ("import json, sys\n"
            "from typer.testing import CliRunner\n"
            "from ltm_cli.app import app\n"
            "results = [(r.exit_code, r.output) for r in (CliRunner().invoke(app, a) for a in json.loads(sys.argv[1]))]\n"
            "print(json.dumps({'results': results, 'loaded': [m for m in ('torch', 'lightning') if m in sys.modules]}))")
    probe = subprocess.run([sys.executable, "-c", code, json.dumps(TYPOS)], capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    for argv, (code_, output) in zip(TYPOS, report["results"]):
        assert code_ == 2 and len([ln for ln in output.splitlines() if ln.strip()]) == 1, (argv, output)
        assert "config error: " in output, (argv, output)
    assert report["loaded"] == [], report["loaded"]


def _commands(group, path=()):
    import typer.main

    command = typer.main.get_command(app) if group is None else group
    for name, sub in getattr(command, "commands", {}).items():
        yield (*path, name), sub
        yield from _commands(sub, (*path, name))


def test_help_keeps_bracketed_text_and_lists_the_config_groups():
    """Rich markup ate `[overrides]` from the help (`ltm train ` with a stray space); every bracketed word of every
    command's help is shown. `ltm train --help` lists each group of conf/ with all its options, read from there."""
    runner = CliRunner(env={"COLUMNS": "400"})
    for path, command in _commands(None):
        shown = runner.invoke(app, [*path, "--help"]).output
        for token in re.findall(r"\\?\[([^\]]+)\]", command.help or ""):
            assert f"[{token}]" in shown, (path, token)
    shown = runner.invoke(app, ["train", "--help"], prog_name="ltm").output
    assert "Usage: ltm train [OPTIONS] [OVERRIDES]..." in shown
    lines = shown.splitlines()
    conf = Path(__file__).resolve().parents[1] / "conf"
    groups = [p for p in conf.iterdir() if p.is_dir() and list(p.glob("*.yaml"))]
    groups += [p for g in list(groups) for p in g.iterdir() if p.is_dir() and list(p.glob("*.yaml"))]  # model/memory
    for group in groups:
        name = group.relative_to(conf).as_posix()
        at = next((i for i, ln in enumerate(lines) if ln.split()[:1] == [name]), None)
        assert at is not None, name
        indent = len(lines[at]) - len(lines[at].lstrip())
        block = [lines[at]]  # the group's line and the lines wrapped under it
        for line in lines[at + 1:]:
            if not line.strip() or len(line) - len(line.lstrip()) <= indent:
                break
            block.append(line)
        for option in group.glob("*.yaml"):
            assert re.search(rf"(?<![\w-]){re.escape(option.stem)}(?![\w-])", " ".join(block)), option
    assert "tiny (default)" in shown and "kjv (default)" in shown and "tokens (default)" in shown
    shown = runner.invoke(app, ["config", "show", "--help"], prog_name="ltm").output
    assert "ltm config show [OPTIONS] [OVERRIDES]..." in shown and "ltm train [overrides]" in shown
    assert "Example: `ltm config show model=small" in shown


def test_only_training_with_lightning_imports_lightning():
    """Lightning's import takes most of a CLI call's start-up (about 6 of `ltm eval`'s 10 s before it was isolated):
    the driver of `ltm train`, generation, evaluation, the benchmarks, quantization, export and the native-parallel
    loop import none of it; `ltm_core.lit` (the Lightning fit) does."""
    code = ("import sys\n"
            "import ltm_cli.app, ltm_core.train, ltm_core.evaluate, ltm_core.inference, ltm_core.checkpoint\n"
            "import ltm_core.bench, ltm_core.quantize, ltm_core.export, ltm_core.tasks.evaluate, ltm_core.parallel.trainer\n"
            "print('lightning' in sys.modules)\n"
            "import ltm_core.lit\n"
            "print('lightning' in sys.modules)")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["False", "True"], probe.stdout
