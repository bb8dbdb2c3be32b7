"""Options every command shares, checked before any work: `--device`, `--json` / `--plot` files; the checkpoint
path's errors; rich's page width when the output is a file or a pipe."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from ltm_cli.app import app
from ltm_cli.errors import device_option, output_file
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


def test_output_file_makes_its_folder_and_refuses_a_folder(tmp_path):
    nested = tmp_path / "a" / "b" / "r.json"
    assert output_file(nested, "--json") == nested and nested.parent.is_dir() and not nested.exists()
    with pytest.raises(ConfigError, match="--json: .* is a folder: give a file name"):
        output_file(tmp_path, "--json")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--json: cannot create the folder"):
        output_file(blocker / "r.json", "--json")
    assert output_file(None, "--json") is None


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
