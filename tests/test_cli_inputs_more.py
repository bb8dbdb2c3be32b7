"""Inputs a user gets wrong or gives in another form: what `read_checkpoint` says about a folder or file that is not a
checkpoint (an ONNX export, a run folder, a text file: what it is and what to give instead), `ltm generate`'s prompt
from a file or stdin (exact bytes; piped stdin without `-p -` noted, not silently dropped) and its sampling options'
errors, and the sequence-length rules of `ltm eval` (any length: a partial last segment is read exactly) and `ltm
bench model` (whole segments, as `ltm train`)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from support import KIND_MEMORY, TINY, ids, kind_config, one_error_line, tiny_model
from ltm_core.checkpoint import read_checkpoint
from ltm_core.errors import CheckpointError

TEXT = "".join(f"Verse {i}: in the beginning was the word, and the word was with the memory.\n" for i in range(200))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder as `ltm train` leaves it (RUN/checkpoints/last.ckpt), the TINY model untrained on a text file:
    written directly (no training: these tests read checkpoints, they do not judge the model)."""
    from ltm_core import TitanModel
    from ltm_core.config import DataConfig
    from ltm_core.configuration import compose, model_config, to_dict

    root = tmp_path_factory.mktemp("inputs")
    (root / "notes.txt").write_text(TEXT)
    cfg = to_dict(compose([*TINY, "data=textfile", f"data.path={root / 'notes.txt'}", f"output_dir={root / 'run'}"]))
    DataConfig(**cfg["data"])
    torch.manual_seed(0)
    model = TitanModel(model_config(cfg))
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": cfg}}, root / "run" / "checkpoints" / "last.ckpt")
    return root / "run"


def invoke(*args: str, input: bytes | None = None):
    from ltm_cli.app import app

    result = CliRunner().invoke(app, list(args), input=input)
    result.returncode = result.exit_code
    return result


def _error(path) -> str:
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# ------------------------------------------------------------------------------------------ 1. checkpoint hints
def test_an_onnx_export_is_named_with_how_it_runs(tmp_path, monkeypatch):
    """An ONNX export folder (`ltm export --format onnx`: onnx.json beside its graphs) given as -c: what it is and that
    OnnxModel runs it; not "give ex_onnx/checkpoints/last.ckpt", which does not exist."""
    monkeypatch.chdir(tmp_path)  # the paths as a user types them
    export = Path("ex_onnx")
    export.mkdir()
    (export / "onnx.json").write_text('{"segment_length": 16}')
    (export / "prefill.onnx").write_bytes(b"\x08\x0a\x12\x07pytorch")
    (export / "README.md").write_text("# ltm model (ONNX)\n")
    for given in (export, export / "prefill.onnx", export / "onnx.json"):
        message = _error(given)
        assert "ONNX export" in message and "OnnxModel" in message and "checkpoints" not in message, message
        assert "README.md" in message and message.count(str(export)) <= 2, message
    one_error_line(invoke("eval", "-c", "ex_onnx"), "ex_onnx is an ONNX export", "OnnxModel")


def test_a_folder_names_a_checkpoint_that_exists(run, tmp_path):
    checkpoints = run / "checkpoints"
    message = _error(checkpoints)  # the folder that holds last.ckpt: that file, not checkpoints/checkpoints/...
    assert f"e.g. {checkpoints / 'last.ckpt'})" in message and "checkpoints/checkpoints" not in message, message
    assert f"e.g. {checkpoints / 'last.ckpt'})" in _error(run)  # a run folder: RUN/checkpoints/last.ckpt, which exists
    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    (empty_run / "config.yaml").write_text("model: {}\n")
    message = _error(empty_run)  # a run folder without a checkpoint: no file named that is not there
    assert message.endswith("this one holds no checkpoint (its checkpoints/ folder is empty)"), message
    assert "e.g." not in message and str(empty_run / "checkpoints" / "last.ckpt") not in message, message
    message = _error(empty_run / "checkpoints")
    assert message.endswith("this one holds no checkpoint") and "e.g." not in message, message
    best_only = tmp_path / "best_only"
    best_only.mkdir()
    (best_only / "best.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes())
    assert f"e.g. {best_only / 'best.ckpt'})" in _error(best_only)
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        (sweep / job / "checkpoints").mkdir(parents=True)
        (sweep / job / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert f"holds 2 runs: give one's .ckpt file (e.g. {sweep / '0' / 'checkpoints' / 'last.ckpt'})" in _error(sweep)


def test_unreadable_files_say_what_they_are(run, tmp_path):
    """No pickle opcode (`(101)` was the unpickler's KeyError for the byte 'e' of "hello"): what the file is, in
    words; torch's own detail kept where it says something (a truncated zip's missing central directory)."""
    def reason(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        message = _error(path)
        assert message.startswith(f"checkpoint error: {path} ") and message.endswith(")"), message
        return message

    text = reason("text.ckpt", b"hello\n")
    assert "not a readable checkpoint (not a torch checkpoint file: it holds text)" in text and "101" not in text
    assert "(the file is empty)" in reason("empty.ckpt", b"")
    good = (run / "checkpoints" / "last.ckpt").read_bytes()
    truncated = reason("truncated.ckpt", good[:len(good) // 2])
    assert "damaged or truncated torch file" in truncated and "central directory" in truncated, truncated
    assert "internal miniz" not in truncated and "PytorchStreamReader" not in truncated, truncated
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes/a.txt", "hi")
    assert "a zip archive, not a torch checkpoint file: it holds no data.pkl" in _error(archive)
    assert "(a pickle, not a torch checkpoint file)" in reason("plain.pkl", b"\x80\x04\x95\x05\x00K\x01.")
    assert "(not a torch checkpoint file)" in reason("random.ckpt", bytes(range(256)) * 4)
    result = invoke("generate", "-c", str(tmp_path / "text.ckpt"))  # the command: the same line, exit 2
    one_error_line(result, "not a torch checkpoint file: it holds text")


def test_a_file_of_an_export_folder_names_the_folder(run, tmp_path):
    from ltm_core.export.safetensors import write_folder

    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    folder = tmp_path / "st"
    folder.mkdir()
    write_folder(folder, {k[len("model."):]: v for k, v in ckpt["state_dict"].items()},
                 ckpt["hyper_parameters"]["config"])
    assert read_checkpoint(folder)["state_dict"]  # the folder itself reads
    for name in ("model.safetensors", "config.json"):
        assert f"is a file of the checkpoint folder {folder}: give the folder (-c {folder})" in _error(folder / name)
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes((folder / "model.safetensors").read_bytes())
    assert "a safetensors file without the config.json" in _error(loose)
    (folder / "config.json").unlink()
    assert "holds safetensors weights but no config.json" in _error(folder)


# ---------------------------------------------------------------------------------------- 2. generate's prompt
def _expected(run: Path, prompt: bytes, n: int) -> str:
    """What `ltm generate -n N -t 0` prints for these prompt bytes: the library's greedy tokens after [BOS, bytes]."""
    from ltm_core.checkpoint import load_model
    from ltm_core.inference import InferenceConfig, InferenceEngine
    from ltm_core.tokenizer import BOS, ByteTokenizer

    tokenizer = ByteTokenizer()
    model = load_model(run / "checkpoints" / "last.ckpt")
    prompt_ids = [BOS, *prompt]
    out = InferenceEngine(model, InferenceConfig(temperature=0)).generate(torch.tensor([prompt_ids]), n)
    decode = tokenizer.stream_decoder()
    return tokenizer.decode(prompt_ids) + "".join(decode(int(t)) for t in out[0, len(prompt_ids):]) + "\n"


def test_prompt_from_stdin_and_file_is_read_exactly(run, tmp_path):
    ckpt = str(run / "checkpoints" / "last.ckpt")
    data = "In the beginning\n".encode() + b"\xff\xfe caf\xc3\xa9\n"  # not UTF-8, a trailing newline: all kept
    expected = _expected(run, data, 6)
    piped = invoke("generate", "-c", ckpt, "-p", "-", "-n", "6", "-t", "0", input=data)
    assert piped.returncode == 0, piped.output
    assert piped.stdout == expected and piped.stderr == ""
    prompt_file = tmp_path / "prompt.bin"
    prompt_file.write_bytes(data)
    from_file = invoke("generate", "-c", ckpt, "--prompt-file", str(prompt_file), "-n", "6", "-t", "0")
    assert from_file.returncode == 0 and from_file.stdout == expected, from_file.output
    assert invoke("generate", "-c", ckpt, "--prompt-file", "-", "-n", "6", "-t", "0", input=data).stdout == expected
    # a literal prompt is the same text without the bytes a command line cannot carry
    text = "In the beginning\n"
    assert invoke("generate", "-c", ckpt, "-p", text, "-n", "6", "-t", "0").stdout == _expected(run, text.encode(), 6)


def test_a_prompt_longer_than_a_command_line_reads_from_a_file(run, tmp_path):
    big = tmp_path / "big.txt"
    body = (TEXT * 20).encode()[:200_000]  # more than the ~128 KB one command-line argument may hold
    big.write_bytes(body)
    result = invoke("generate", "-c", str(run / "checkpoints" / "last.ckpt"), "--prompt-file", str(big), "-n", "2",
                    "-t", "0")
    assert result.returncode == 0, result.output
    assert result.stdout.startswith(body.decode()) and len(result.stdout) == len(body) + 3


def test_prompt_options_errors_are_one_line(run, tmp_path):
    ckpt = str(run / "checkpoints" / "last.ckpt")
    (tmp_path / "p.txt").write_text("hi")
    one_error_line(invoke("generate", "-c", ckpt, "-p", "hi", "--prompt-file", str(tmp_path / "p.txt")),
                   "--prompt-file", "--prompt", "not --prompt and --prompt-file together")
    one_error_line(invoke("generate", "-c", ckpt, "-p", "-", "--prompt-file", "-"), "--prompt-file")
    one_error_line(invoke("generate", "-c", ckpt, "--prompt-file", str(tmp_path / "missing.txt")),
                   "--prompt-file", "missing.txt does not exist")
    one_error_line(invoke("generate", "-c", ckpt, "--prompt-file", str(tmp_path)), "--prompt-file", "is a folder")


@pytest.mark.parametrize("argv, option", [(["--top-p", "0"], "--top-p: must be in (0, 1], got 0.0"),
                                          (["--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5")])
def test_sampling_errors_name_the_option(run, argv, option):
    result = invoke("generate", "-c", str(run / "checkpoints" / "last.ckpt"), *argv)
    one_error_line(result, option)
    assert "top_p" not in result.stderr


def test_piped_stdin_without_a_prompt_option_is_noted(run, tmp_path, monkeypatch):
    """`echo text | ltm generate -c C` reads nothing (a pipe nobody asked to read could block forever) and generates
    from BOS, as before, but says so in one line on stderr, naming `-p -`; a terminal, /dev/null or an empty file
    gets no note."""
    from support import PAGE_COLUMNS
    from ltm_cli.app import _stdin_holds_input

    read_end, write_end = os.pipe()
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "full").write_bytes(b"x")
    with open(read_end, "rb") as pipe, open(os.devnull, "rb") as null, open(tmp_path / "empty", "rb") as empty, \
            open(tmp_path / "full", "rb") as full:
        os.close(write_end)
        for stream, holds in ((pipe, True), (full, True), (null, False), (empty, False)):
            monkeypatch.setattr(sys, "stdin", stream)
            assert _stdin_holds_input() is holds, stream
    monkeypatch.undo()

    cmd = [str(Path(sys.executable).with_name("ltm")), "generate", "-c", str(run / "checkpoints" / "last.ckpt"), "-n",
           "4", "-t", "0"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": PAGE_COLUMNS}
    piped = subprocess.run(cmd, input=b"In the beginning\n", capture_output=True, env=env, timeout=120)
    assert piped.returncode == 0, piped.stderr.decode()[-2000:]
    assert piped.stdout.decode() == _expected(run, b"", 4)
    notes = [line for line in piped.stderr.decode().splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: stdin was not read") and "-p -" in notes[0], notes


# ---------------------------------------------------------------------------------------------- 3. lengths
@pytest.mark.parametrize("kind", [*KIND_MEMORY, "no memory"])
def test_a_partial_last_segment_is_read_exactly(kind):
    """What lets `ltm eval` take any data.seq_len: 40 tokens (2.5 segments of 16) give the logits of the first 40
    of 64, for every memory kind (the write a segment's end makes comes after every token scored)."""
    cfg = kind_config("tokens", use_memory=False) if kind == "no memory" else kind_config(kind)
    model = tiny_model(cfg, perturb=True).eval()
    tokens = ids(64)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:, :40]).logits, model(tokens).logits[:, :40], rtol=0, atol=1e-5)


def test_eval_takes_any_length_with_its_own_data_or_another(run):
    """`data.seq_len=40` with segments of 16: measured (it was, silently) and now also with `data=textfile ...`,
    which the train config's whole-segment rule refused; a bad length is one line naming data.seq_len."""
    import json

    ckpt = str(run / "checkpoints" / "last.ckpt")
    notes = run.parent / "notes.txt"
    for extra in ([], ["data=textfile", f"data.path={notes}"]):
        out = run.parent / f"eval{len(extra)}.json"
        result = invoke("eval", "-c", ckpt, *extra, "data.seq_len=40", "data.val_samples=3", "--json", str(out),
                        "--device", "cpu")
        assert result.returncode == 0, result.output
        assert json.loads(out.read_text())["tokens"] == 3 * 40
    for bad in ("0", "-3"):
        one_error_line(invoke("eval", "-c", ckpt, "data=textfile", f"data.path={notes}", f"data.seq_len={bad}"),
                       "data.seq_len", "must be a positive integer")


def test_bench_model_contexts_are_whole_segments_as_in_train():
    from ltm_cli.bench import check_training_lengths

    result = invoke("bench", "model", "--context", "64", "--context", "40", "--device", "cpu",
                    "model.segment_length=16")
    one_error_line(result, "--context: 40 must be a multiple of model.segment_length=16")
    with pytest.raises(Exception, match="--context: 100 must be a multiple of model.segment_length=64"):
        check_training_lengths([128, 100], 64, ["memory", "full_causal"])
    check_training_lengths([100], 64, ["full_causal"])  # its one segment spans the context: any length


def test_bench_parallel_json_records_how_it_was_measured(tmp_path):
    """Every benchmark JSON carries the command, date, machine and commit that made it (`meta`), as the docs'
    numbers must name their command."""
    import json

    out = tmp_path / "bp.json"
    result = invoke("bench", "parallel", "-p", "single", "--steps", "1", "--json", str(out), "model.hidden_size=32",
                    "model.num_hidden_layers=1")
    assert result.returncode == 0, result.output[-2000:]
    meta = json.loads(out.read_text())["meta"]
    assert {"command", "date", "machine", "commit"} <= set(meta) and meta["date"]  # (in-process: argv is pytest's)


def test_run_meta_names_the_processor(tmp_path):
    """A result's machine names its processor's model (timings differ between processors of one architecture):
    from /proc/cpuinfo's `model name`, else a non-empty fallback when the file is missing or has none."""
    from ltm_cli.bench import cpu_name, run_meta

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n")
    assert cpu_name(info) == "AMD EPYC 9R14"
    unnamed = tmp_path / "unnamed"
    unnamed.write_text("processor\t: 0\nmodel name\t: \n")
    assert cpu_name(tmp_path / "absent") and cpu_name(unnamed) != ""
    assert f"({cpu_name()})" in run_meta()["machine"]
