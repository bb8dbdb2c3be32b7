"""The `ltm` console script end to end, in subprocesses, as a user runs it. Each command runs at least once as a
subprocess (the console script, its exit code, a fresh interpreter); the further calls of a test, error paths
above all, go through the same Typer app in this process (`support.invoke`): the same code without the seconds
of imports a new interpreter pays."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from support import TINY, invoke, one_error_line, run_ltm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_ltm("train", *TINY, "trainer.max_steps=6", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ltm generate --checkpoint" in result.stdout
    return out


def test_train_writes_run_folder(trained):
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    assert (trained / "checkpoints" / "best.ckpt").is_file()
    assert "hidden_size: 32" in (trained / "config.yaml").read_text()
    header, *rows = (trained / "metrics.csv").read_text().splitlines()
    assert "train/loss" in header and "val/bpb" in header
    assert len([r for r in rows if r.split(",")[header.split(",").index("train/loss")]]) == 6


def test_a_stage_two_run_prints_no_lightning_warning(trained, tmp_path):
    """`resume=` another run's checkpoint into a new folder (the recipes' stage 2) with Python's warnings shown: no
    Lightning note about its checkpoint folder having changed."""
    result = run_ltm("train", *TINY, "trainer.max_steps=8", f"resume={trained / 'checkpoints' / 'last.ckpt'}",
                     f"output_dir={tmp_path / 'stage2'}", "trainer.progress=false", warnings=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dirpath has changed" not in result.stderr and "Warning" not in result.stderr, result.stderr


def test_generate_streams_text(trained):
    result = run_ltm("generate", "--checkpoint", str(trained / "checkpoints" / "last.ckpt"), "--prompt", "In the",
                     "--max-new-tokens", "300", "--seed", "0", "--top-k", "20", "--top-p", "0.9")
    assert result.returncode == 0, result.stderr[-2000:]
    # exactly what the library's engine samples from the same checkpoint and settings (the CLI is a thin layer)
    import torch

    from ltm_core.checkpoint import load_model
    from ltm_core.inference import InferenceConfig, InferenceEngine
    from ltm_core.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    engine = InferenceEngine(load_model(trained / "checkpoints" / "last.ckpt", device="cpu"),
                             InferenceConfig(temperature=0.8, top_k=20, top_p=0.9, seed=0))
    prompt = torch.tensor([tokenizer.encode("In the", bos=True)])
    generated = [int(t[0]) for t in engine.stream(prompt, 300)]
    decode = tokenizer.stream_decoder()
    assert generated and result.stdout == "In the" + "".join(decode(t) for t in generated) + "\n"


def test_eval_reports_loss_and_bpb(trained, tmp_path):
    one_error_line(invoke("eval", "--checkpoint", str(tmp_path / "missing.ckpt"), "--json", str(tmp_path / "new" /
                                                                                                "eval.json")),
                   "does not exist")
    assert not (tmp_path / "new").exists()  # the --json folder is made by the writer, after the checks
    out = tmp_path / "new" / "eval.json"
    result = run_ltm("eval", "--checkpoint", str(trained / "checkpoints" / "last.ckpt"), "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bits/byte" in result.stdout
    metrics = json.loads(out.read_text())
    assert abs(metrics["bpb"] - metrics["loss"] / 0.6931471805599453) < 1e-9
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    result = invoke("eval", "--checkpoint", str(trained / "checkpoints" / "last.ckpt"), "data=textfile",
                    f"data.path={text}", "data.seq_len=64")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("args, needle", [
    (["--by-postion"], "--by-postion: no such option"), (["--jsn", "out.json"], "--jsn: no such option"),
    (["bogus=1"], "bogus: ltm eval takes data.*, model.*, task.* overrides only"),
    (["+bogus=1"], "bogus: ltm eval takes"), (["trainer.max_steps=abc"], "trainer.max_steps: ltm eval takes"),
    (["foo"], "foo: is not an override")])
def test_eval_refuses_what_it_would_ignore(trained, args, needle):
    """A misspelt option or an override eval does not read is one line and exit 2, not a silent default run."""
    result = invoke("eval", "--checkpoint", str(trained / "checkpoints" / "last.ckpt"), *args)
    one_error_line(result, needle)


def test_eval_by_position_compares_checkpoints_on_one_table_json_and_plot(trained, tmp_path):
    """`--by-position` with two runs (the memory model and a no-memory one trained on shorter samples): the same
    validation windows once data.seq_len is given, one curve each; the plot holds both."""
    baseline = tmp_path / "baseline"
    result = invoke("train", *TINY, "model.use_memory=false", "data.seq_len=32", "trainer.max_steps=2",
                    f"output_dir={baseline}")
    assert result.returncode == 0, result.stderr[-2000:]
    memory, local = str(trained / "checkpoints" / "last.ckpt"), str(baseline / "checkpoints" / "last.ckpt")
    one_error_line(invoke("eval", "-c", memory, "-c", local, "--by-position"), "data.seq_len", "same windows")
    one_error_line(invoke("eval", "-c", memory, "-c", local), "--checkpoint", "--by-position")
    one_error_line(invoke("eval", "-c", memory, "--by-position", "task=passkey"), "--by-position", "not on a task")
    out, image = tmp_path / "positions.json", tmp_path / "positions.png"
    plot = ["--plot", str(image)] if importlib.util.find_spec("matplotlib") else []
    result = invoke("eval", "-c", memory, "-c", local, "--by-position", "data.seq_len=64", "--json", str(out), *plot)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bits/byte by token position" in result.stdout
    results = json.loads(out.read_text())
    assert results["seq_len"] == 64 and results["bin_segment"] == 16
    assert [run["label"] for run in results["runs"]] == [trained.name, "baseline"]
    assert [run["memory"] for run in results["runs"]] == ["tokens", None]
    for run in results["runs"]:
        assert [(b["start"], b["end"]) for b in run["bins"]][:8] == [(2 * i, 2 * i + 2) for i in range(8)]
        assert run["bins"][-1]["end"] == 64 and len(run["segments"]) == 4
    if plot:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_overrides_exit_2_with_one_line(tmp_path):
    """The CLI's side of config errors (their messages are covered in test_config.py)."""
    _one_error_line(run_ltm("train", "model.hiden_size=64", cwd=tmp_path), "model.hiden_size", "unknown key")
    _one_error_line(run_ltm("train", "-m", "model.segment_length=16,0", cwd=tmp_path), "model.segment_length")
    assert list(tmp_path.iterdir()) == []  # the sweep was checked before any job started: nothing written


def test_bad_checkpoints_exit_2(trained, tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(4096))
    _one_error_line(run_ltm("generate", "--checkpoint", str(junk)), "junk.ckpt", "not a readable checkpoint")
    one_error_line(invoke("generate", "--checkpoint", str(tmp_path / "missing.ckpt")), "does not exist")
    _one_error_line(run_ltm("eval", "--checkpoint", str(junk)), "not a readable checkpoint")
    # an override that changes the weights is named, not the checkpoint that no longer fits them
    for override, key in (("model.hidden_size=64", "model.hidden_size"), ("model.use_memory=false", "model.use_memory")):
        one_error_line(invoke("eval", "--checkpoint", str(trained / "checkpoints" / "last.ckpt"), override),
                       f"{key}: ={override.split('=')[1]} changes the model's weights")


def test_bad_data_and_existing_run_exit_2_and_lose_nothing(trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "new"
    one_error_line(invoke("train", *TINY, "data=textfile", f"data.path={empty}", f"output_dir={out}"),
                   "empty.txt", "empty")
    assert not out.exists()  # nothing written for a run that could not start
    before = (trained / "checkpoints" / "last.ckpt").read_bytes()
    one_error_line(invoke("train", *TINY, f"output_dir={trained}"), "already holds a run", "resume=auto")
    assert (trained / "checkpoints" / "last.ckpt").read_bytes() == before


def test_multirun_sweep_one_folder_per_job(tmp_path):
    result = invoke("train", "-m", *TINY, "model.hidden_size=32,64", "trainer.max_steps=2",
                    f"output_dir={tmp_path / 'sweep'}")  # a sweep in a subprocess: test_ddp_two_processes_inside_a_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    for job, hidden in (("0", 32), ("1", 64)):
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").is_file()
        assert f"hidden_size: {hidden}" in (tmp_path / "sweep" / job / "config.yaml").read_text()


def test_ddp_two_processes_inside_a_sweep(tmp_path):
    """parallel=ddp starts its own processes, also from a -m sweep job (not re-running the sweep: a one-job sweep,
    whose workers would otherwise write job folders of their own)."""
    result = run_ltm("train", "-m", *TINY, "parallel=ddp", "trainer.max_steps=3", "model.bptt_segments=2",
                     f"output_dir={tmp_path / 'ddp'}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ddp" / "0" / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.is_dir()) == ["0"]  # no sweeps of their own


def test_config_show_and_help():
    result = run_ltm("config", "show", "model=base", "precision=bf16-mixed")
    assert result.returncode == 0, result.stderr
    for needle in ("hidden_size: 768", "num_attention_heads: 12", "num_hidden_layers: 12", "kind: tokens",
                   "slots: 512", "lightning: bf16-mixed"):
        assert needle in result.stdout
    help_text = run_ltm("--help").stdout
    for command in ("train", "generate", "eval", "quantize", "bench", "export", "config"):
        assert command in help_text
    assert "--max-new-tokens" in run_ltm("generate", "--help").stdout


def test_wheel_install_works_from_another_directory(tmp_path):
    """A non-editable install carries conf/ and runs from anywhere.

    The wheel goes into a nested venv that borrows its dependencies (torch, ...) from the environment running the
    tests, through a .pth file. `system_site_packages=True` would borrow the *base* interpreter's instead, which
    in a fresh venv has no torch (the README's test command then failed in any venv but the system one)."""
    source = tmp_path / "source"  # a copy: setuptools would reuse (and ship) a stale build/ of the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "ltm_core", "ltm_cli", "extensions", "conf"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("ltm-*.whl"))
    packed = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("ltm_core", "ltm_core"), ("ltm_cli", "ltm_cli"), ("extensions", "ltm_extensions"),
                            ("conf", "ltm_conf")):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                assert f"{package}/{path.relative_to(ROOT / folder).as_posix()}" in packed, path  # subpackages too
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False)  # installed into by this environment's pip
    py = env_dir / "bin" / "python"
    nested_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(nested_site) / "test_env.pth").write_text("\n".join(sorted(ours)) + "\n")  # appended after its own site
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(py), "-c", "import ltm_core, ltm_conf, torch; "
                            "print(ltm_core.__file__, ltm_conf.__file__); print(torch.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    ltm_files, torch_file = probe.stdout.splitlines()[:2] if probe.returncode == 0 else (probe.stderr, "")
    assert str(env_dir) in ltm_files, probe.stdout + probe.stderr  # not the source tree
    assert any(torch_file.startswith(site) for site in ours), torch_file  # this environment's torch, not the base's
    subpackages = sorted(".".join(p.parent.relative_to(ROOT).parts) for top in ("ltm_core", "ltm_cli")
                         for p in (ROOT / top).rglob("__init__.py") if p.parent != ROOT / top)
    probe = subprocess.run([str(py), "-c", "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]",
                            *subpackages], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert subpackages and probe.returncode == 0, probe.stderr[-1500:]  # each package folder is in the wheel
    shown = subprocess.run([str(env_dir / "bin" / "ltm"), "config", "show", "model=small"], cwd=elsewhere,
                           capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "hidden_size: 384" in shown.stdout


def test_eval_shows_progress_by_length_and_cell(trained, tmp_path, monkeypatch):
    """`ltm eval task=...` draws a bar of samples scored, labelled with the cell being scored (it was silent for
    minutes), `ltm eval` one of validation windows; the bar goes to stderr and is removed, the table stays."""
    import io

    from rich.console import Console
    from typer.testing import CliRunner

    import ltm_cli.progress
    from ltm_cli.app import app

    screen = io.StringIO()
    monkeypatch.setattr(ltm_cli.progress, "console", Console(file=screen, force_terminal=True, width=120))
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(trained / "checkpoints" / "last.ckpt"),
                                      "task=passkey", "task.lengths=[128,192]", "task.samples=2",
                                      "task.batch_size=1", "task.depth_bins=1", "task.placement_checks=false"])
    assert result.exit_code == 0, result.output
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "task=passkey" in shown and "samples" in shown
    for where in ("length 128, depth 0.5 (cell 1/2)", "length 192, depth 0.5 (cell 2/2)", "3/4"):
        assert where in shown, shown
    assert "exact match" in result.output  # the table
    screen.truncate(0)
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(trained / "checkpoints" / "last.ckpt")])
    assert result.exit_code == 0 and "bits/byte" in result.output, result.output
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "eval" in shown and "/4 windows" in shown and "64-token windows" in shown, shown  # TINY: 4 val samples


def test_bench_model_shows_progress_by_row(monkeypatch):
    import io

    from rich.console import Console
    from typer.testing import CliRunner

    import ltm_cli.progress
    from ltm_cli.app import app

    screen = io.StringIO()
    monkeypatch.setattr(ltm_cli.progress, "console", Console(file=screen, force_terminal=True, width=120))
    result = CliRunner().invoke(app, ["bench", "model", "--context", "32", "--variant",
                                      "segment_local", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                      "model.hidden_size=32", "model.num_attention_heads=2",
                                      "model.num_hidden_layers=1", "model.segment_length=16"])
    assert result.exit_code == 0, result.output
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "bench model" in shown and "segment_local @ 32 tokens" in shown and "0/1 rows" in shown, shown
    assert "tokens/s" in result.output  # the table
