"""Reliability, in process (docs/reliability.md): a diverging loss, two runs in one folder, damaged and hostile files,
a full disk, generation input and output, and a property-based fuzz of the command line."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from support import PAGE_COLUMNS, TINY, inject_nan
from ltm_cli.app import app
from ltm_core.checkpoint import read_checkpoint
from ltm_core.configuration import compose
from ltm_core.errors import CheckpointError, ConfigError, DataError
from ltm_core.run_guard import RunInUse, RunLock
from ltm_core.train import train

RUNNER = CliRunner()


def cli(*args: str):
    return RUNNER.invoke(app, list(args), catch_exceptions=True)


def one_line(result, code: int = 2, *needles: str) -> str:
    """The CLI exited with `code` and printed exactly one line (no traceback)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]  # stdout: a run's banner, if it started
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "corpus.txt"
    path.write_text("the lord said unto him, go in peace. " * 400)
    return path


def _cfg(out: Path, text_file: Path, *overrides: str):
    return compose(TINY + ["data=textfile", f"data.path={text_file}", f"output_dir={out}",
                           "trainer.checkpoint_every_minutes=0", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file) -> Path:
    out = tmp_path_factory.mktemp("inputs-run") / "run"
    train(_cfg(out, text_file, "trainer.max_steps=2"))
    return out / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------------------------------ 2. divergence
def test_nonfinite_steps_are_skipped_and_counted(monkeypatch, tmp_path, text_file):
    inject_nan(monkeypatch, {3, 4})
    last = train(_cfg(tmp_path / "run", text_file, "trainer.max_steps=8"))
    ckpt = read_checkpoint(last)
    assert ckpt["global_step"] == 8 and ckpt["bad_steps"] == 2  # the two bad batches were dropped, 8 steps applied
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("train/bad_steps")
    counts = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert counts[:2] == [0.0, 0.0] and counts[-1] == 2.0


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, text_file):
    inject_nan(monkeypatch, None, after=5)  # steps 1-5 train; every later attempt is NaN
    out = tmp_path / "run"
    args = TINY + ["data=textfile", f"data.path={text_file}", f"output_dir={out}", "trainer.max_steps=20",
                   "trainer.checkpoint_every_minutes=0"]
    line = one_line(cli("train", *args), 2, "training diverged at step 6: 3 attempts in a row",
                    f"the last good checkpoint is {out / 'checkpoints' / 'last.ckpt'} (step 5)",
                    "lower optim.lr, then continue with: ltm train")
    assert line.endswith("resume=auto")
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 5 and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


# ------------------------------------------------------------------------------------------- 3. concurrent use
def test_second_run_into_a_live_runs_folder_refuses(tmp_path, text_file):
    out = tmp_path / "run"
    with RunLock(out):  # a live run holds the folder
        line = one_line(cli("train", *TINY, "data=textfile", f"data.path={text_file}", f"output_dir={out}",
                            "trainer.max_steps=2"), 2, f"{out} is in use by a running `ltm train` (pid {os.getpid()}")
        assert "choose another output_dir" in line
        with pytest.raises(RunInUse):
            train(_cfg(out, text_file, "trainer.max_steps=2", "resume=auto"))
    assert not (out / "checkpoints").exists()  # the refused runs wrote nothing


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, text_file):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ltm_core.run_guard import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUse):
        train(_cfg(out, text_file, "trainer.max_steps=2"))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in (out / ".lock").read_text()  # the killed run's lock file is still there
    last = train(_cfg(out, text_file, "trainer.max_steps=2"))
    assert read_checkpoint(last)["global_step"] == 2 and not (out / ".lock").exists()


# --------------------------------------------------------------------------------- 4. damaged and hostile files
def test_damaged_token_cache_is_detected_and_rebuilt(tmp_path, capfd):
    from ltm_core.config import DataConfig
    from ltm_core.data import load_corpus

    (tmp_path / "a.txt").write_text("in the beginning was the word " * 300)
    cfg = DataConfig(name="textfile", path=str(tmp_path / "a.txt"), seq_len=64, cache_dir=str(tmp_path / "cache"))
    good = np.asarray(load_corpus(cfg).train).copy()
    (cache,) = (tmp_path / "cache").glob("tokens-*.npy")
    data = cache.read_bytes()
    for damage in (data[:len(data) // 2], data[:-2] + b"\x00\x01"):  # truncated; the same size, altered
        cache.write_bytes(damage)
        assert np.array_equal(np.asarray(load_corpus(cfg).train), good)
        assert "is damaged" in capfd.readouterr().err and cache.read_bytes() == data


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _hostile(trained: Path, tmp_path: Path) -> dict[str, Path]:
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    raw = trained.read_bytes()
    name = next(k for k, v in ckpt["state_dict"].items() if v.dim() == 2)
    files = {"truncated": tmp_path / "truncated.ckpt", "empty": tmp_path / "empty.ckpt",
             "random": tmp_path / "random.ckpt"}
    files["truncated"].write_bytes(raw[:len(raw) // 2])
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(5000))
    shape = {**ckpt, "state_dict": {**ckpt["state_dict"], name: torch.zeros(3, 5)}}
    files["shape"] = _save(tmp_path / "shape.ckpt", shape)
    dtype = {**ckpt, "state_dict": {**ckpt["state_dict"], name: ckpt["state_dict"][name].to(torch.int64)}}
    files["dtype"] = _save(tmp_path / "dtype.ckpt", dtype)
    bad_config = json.loads(json.dumps(ckpt["hyper_parameters"]))
    bad_config["config"]["model"]["hidden_size"] = "abc"
    files["config"] = _save(tmp_path / "config.ckpt", {**ckpt, "hyper_parameters": bad_config})
    return files


class _Payload:
    """Unpickling this runs `touch MARKER`: a real code-execution payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "not a readable checkpoint"), ("empty", "not a readable checkpoint"),
    ("random", "not a readable checkpoint"), ("shape", "has shape [3, 5]"), ("dtype", "has dtype torch.int64"),
    ("config", "model.hidden_size")])
def test_damaged_checkpoints_give_one_line(trained, tmp_path, kind, message):
    path = _hostile(trained, tmp_path)[kind]
    one_line(cli("generate", "--checkpoint", str(path), "-n", "3"), 2, str(path), message)
    one_line(cli("eval", "--checkpoint", str(path)), 2, message)
    args = [*TINY, "data=textfile", f"data.path={trained.parent.parent / 'x.txt'}"]
    run = trained.parent.parent
    resumed = one_line(cli("train", *TINY, f"data.path={_data_path(run)}", "data=textfile",
                           f"output_dir={tmp_path / 'resumed'}", f"resume={path}", "trainer.max_steps=3"), 2, message)
    assert "Traceback" not in resumed and args
    assert not (tmp_path / "resumed").exists()  # found after the folder was prepared: undone


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["damaged resume", "resume inside", "fp16 on cpu", "gpu", "triton on cpu"])
def test_a_run_that_cannot_start_leaves_the_folder_as_it_was(trained, tmp_path, case):
    """Bad input found at any point before the first checkpoint (a damaged resume checkpoint is read only inside the
    trainer, after the folder is prepared) gives one line, exit 2, and changes nothing: overwrite=true deletes the
    old run only once the new one has started; a fresh folder is not left behind (a config.yaml there would make
    the corrected command refuse the folder)."""
    if case in ("fp16 on cpu", "gpu", "triton on cpu") and torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    run = trained.parent.parent
    held = tmp_path / "held"
    shutil.copytree(run, held)
    before = _files(held)
    damaged = _hostile(trained, tmp_path)["truncated"]
    bad, needle = {"damaged resume": (f"resume={damaged}", "not a readable checkpoint"),
                   "resume inside": (f"resume={held / 'checkpoints' / 'last.ckpt'}", "overwrite=true clears"),
                   "fp16 on cpu": ("precision=fp16-mixed", "fp16-mixed needs a CUDA GPU"),
                   "gpu": ("trainer.accelerator=gpu", "needs a CUDA GPU"),
                   "triton on cpu": ("model.kernels=triton", "triton needs a CUDA GPU")}[case]
    args = [*TINY, "data=textfile", f"data.path={_data_path(run)}", "trainer.max_steps=3", bad]
    one_line(cli("train", *args, f"output_dir={held}", "overwrite=true"), 2, needle)
    assert _files(held) == before and not list(held.glob(".replaced-*"))
    if case != "resume inside":  # (into another folder that resume is fine)
        one_line(cli("train", *args, f"output_dir={tmp_path / 'fresh'}"), 2, needle)
        assert not (tmp_path / "fresh").exists()


def test_overwrite_replaces_the_old_run_once_the_new_one_starts(trained, tmp_path):
    run = trained.parent.parent
    held = tmp_path / "held"
    shutil.copytree(run, held)
    old = (held / "checkpoints" / "last.ckpt").read_bytes()
    result = cli("train", *TINY, "data=textfile", f"data.path={_data_path(run)}", "trainer.max_steps=3",
                 f"output_dir={held}", "overwrite=true", "trainer.progress=false")
    assert result.exit_code == 0, result.output
    assert read_checkpoint(held / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert (held / "checkpoints" / "last.ckpt").read_bytes() != old and not list(held.glob(".replaced-*"))


@pytest.mark.parametrize("where, needle", [("a file", "is a file, not a folder"), ("under a file", "cannot create")])
def test_output_dir_that_cannot_be_a_folder_gives_one_line(tmp_path, text_file, where, needle):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "a file" else tmp_path / "afile" / "run"
    one_line(cli("train", *TINY, "data=textfile", f"data.path={text_file}", f"output_dir={out}"), 2, needle)
    assert (tmp_path / "afile").read_text() == "x"


def _data_path(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]


def test_optimizer_state_of_the_wrong_shape_gives_one_line(trained, tmp_path):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    state = ckpt["optimizer_states"][0]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(7)
    path = _save(tmp_path / "optim.ckpt", ckpt)
    one_line(cli("train", *TINY, "data=textfile", f"data.path={_data_path(trained.parent.parent)}",
                 f"output_dir={tmp_path / 'r'}", f"resume={path}", "trainer.max_steps=3"), 2,
             "optimizer state exp_avg of parameter")


def test_pickle_payload_is_refused_without_running_it(trained, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    evil = tmp_path / "evil.ckpt"
    torch.save({**ckpt, "payload": _Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is real: a plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    for args in (["generate", "--checkpoint", str(evil), "-n", "2"], ["eval", "--checkpoint", str(evil)],
                 ["train", *TINY, "data=textfile", f"data.path={_data_path(trained.parent.parent)}",
                  f"output_dir={tmp_path / 'r'}", f"resume={evil}", "trainer.max_steps=3"]):
        one_line(cli(*args), 2, "holds a pickled object that would run code (posix.system); refused")
        assert not marker.exists()


def test_pickle_payload_in_a_distributed_checkpoint_index_is_refused(tmp_path):
    from ltm_core.parallel.checkpoint import _Reader

    step = tmp_path / "step-00000001"
    step.mkdir()
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="refused global posix.system"):
        _Reader(str(step)).read_metadata()
    assert not marker.exists()


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace("hidden_size: 32", "hidden_size: abc"), "model.hidden_size"),
    (lambda t: t.replace("hidden_size: 32", "hidden_sise: 32"), "model.hidden_sise"),
    (lambda t: t.replace("hidden_size: 32", "hidden_size: ${nowhere}"), "model.hidden_size"),
    (lambda t: t.replace("model:", "model: [", 1), "config.yaml"),
    (lambda t: t.replace("model:", "modle:", 1), "config.yaml"),
])
def test_config_yaml_edited_into_nonsense_gives_one_line_naming_the_key(tmp_path, text_file, edit, key):
    out = tmp_path / "run"
    train(_cfg(out, text_file, "trainer.max_steps=1"))
    saved = out / "config.yaml"
    saved.write_text(edit(saved.read_text()))
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        train(_cfg(out, text_file, "trainer.max_steps=2", "resume=auto"))
    assert "\n" not in str(err.value) and str(saved) in str(err.value)


def test_data_with_invalid_utf8_and_nul_bytes_trains(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes((b"valid text \xff\xfe\x00 more \xc3\x28 text\x00\n" * 300))
    last = train(compose(TINY + ["data=textfile", f"data.path={path}", f"output_dir={tmp_path / 'run'}",
                                 "trainer.max_steps=2"]))
    assert read_checkpoint(last)["global_step"] == 2


def test_jsonl_line_without_text_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"txt": "b"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ' has no "text" field'):
        train(compose(TINY + ["data=textfile", f"data.path={path}", f"output_dir={tmp_path / 'run'}"]))


# --------------------------------------------------------------------------------------------------- 5. full disk
def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_keeps_the_last_checkpoint_and_stops_with_one_line(tmp_path, text_file, monkeypatch):
    """A save that fails for lack of space: on a small tmpfs that the test fills after the first checkpoint (root),
    otherwise with a writer that fails as a full disk does."""
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, "4m")
    try:
        out = disk / "run"
        import ltm_core.run_guard as run_guard

        real, saves = run_guard.atomic_file, [0]

        def atomic_file(path):  # after the first complete checkpoint: the disk fills up
            if path.name == "last.ckpt":
                saves[0] += 1
                if saves[0] == 2:
                    if mounted:
                        with open(disk / "filler", "wb") as f:
                            try:
                                while True:
                                    f.write(b"\0" * 65536)
                                    f.flush()
                            except OSError:
                                pass
                    else:
                        raise run_guard._write_failed(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            return real(path)

        monkeypatch.setattr(run_guard, "atomic_file", atomic_file)
        args = TINY + ["data=textfile", f"data.path={text_file}", f"output_dir={out}", "trainer.max_steps=20",
                       "trainer.checkpoint_every_minutes=0", "trainer.val_check_interval=3"]
        line = one_line(cli("train", *args), 2, f"cannot write {out / 'checkpoints'}",
                        "No space left on device", "free space, then continue with: ltm train")
        assert "the previous last.ckpt is intact" in line or "are intact" in line
        assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3
        assert not list((out / "checkpoints").glob(".*tmp*"))  # no half-written file left
        (disk / "filler").unlink(missing_ok=True)
        monkeypatch.setattr(run_guard, "atomic_file", real)
        assert cli("train", *args, "resume=auto").exit_code == 0
        assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 20
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------------ 6. generation input and output
@pytest.mark.parametrize("prompt", ["", "héllo wörld", "日本語のテキスト", "مرحبا بالعالم", "🙂🚀 emoji", "e\u0301",
                                    "nul\x00byte", "\udcff\udcfe undecodable argv bytes", "lone \ud800 surrogate"])
def test_generate_takes_any_prompt(trained, prompt):
    result = cli("generate", "--checkpoint", str(trained), "--prompt", prompt, "-n", "8", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")


def test_generate_max_new_tokens_zero_negative(trained):
    result = cli("generate", "--checkpoint", str(trained), "--prompt", "In the", "-n", "0")
    assert result.exit_code == 0 and result.stdout == "In the\n"  # 0: the prompt only
    one_line(cli("generate", "--checkpoint", str(trained), "-n", "-5"), 2, "--max-new-tokens", "must be 0 or more")


def test_invalid_utf8_output_prints_with_replacement_on_any_terminal(trained, tmp_path):
    """Generated bytes that are not UTF-8 print as U+FFFD, and a terminal that cannot show a character gets "?":
    `ltm generate` on an ASCII-only stdout, with a prompt that is not ASCII and a model that emits any byte."""
    from ltm_core.tokenizer import ByteTokenizer

    decode = ByteTokenizer().stream_decoder()
    assert "".join(decode(b) for b in b"ok \xff\xc3( \xe2\x82") + decode(ord("!")) == "ok \ufffd\ufffd( \ufffd!"
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONWARNINGS": "ignore"}
    exe = Path(sys.executable).with_name("ltm")
    result = subprocess.run([str(exe), "generate", "--checkpoint", str(trained), "--prompt", "héllo 🙂", "-n", "200",
                             "--temperature", "2.0", "--seed", "1"], capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.startswith(b"h?llo ?")


@pytest.mark.parametrize("tokens", [pytest.param(20_000, marks=pytest.mark.slow), 4_000])
def test_huge_max_new_tokens_streams_in_constant_memory(trained, tokens):
    """A huge --max-new-tokens is a lazy count; the resident memory after `tokens` tokens equals that after a tenth of
    them (no growth with the length generated). 20K tokens take a minute on the 2-core CPU: the slow variant."""
    from ltm_core.checkpoint import load_model
    from ltm_core.inference import InferenceConfig, InferenceEngine

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    engine = InferenceEngine(load_model(trained), InferenceConfig(temperature=1.0, seed=0, stop_at_eos=False))
    sizes = {}
    for i, _ in enumerate(engine.stream(torch.tensor([[256, 65]]), 10**12), 1):  # a huge count: a lazy stream
        if i in (tokens // 10, tokens):
            sizes[i] = rss()
        if i == tokens:
            break
    assert sizes[tokens] - sizes[tokens // 10] < 4 * 2**20, sizes


# ------------------------------------------------------------------------------------------ 7. fuzzing the CLI
class Reached(SystemExit):
    """Raised by the stand-ins of the expensive work: the command got through every check to its work (a success,
    exit code 0; a SystemExit, so that Hydra lets it through as it does a finished run's exit)."""

    def __init__(self):
        super().__init__(0)


GROUPS = {"model": ["tiny", "small", "nope"], "data": ["kjv", "textfile", "passkey", "mqar", "babi_facts", "zzz"],
          "optim": ["adamw", "sgd"], "precision": ["fp32", "bf16-mixed", "fp16-mixed", "half"],
          "parallel": ["single", "ddp", "tp2", "pp4", "fsdp", "x"], "trainer": ["default", "debug", "fast"],
          "experiment": ["passkey", "mqar", "babi_facts_baseline", "nothing"], "task": ["passkey", "mqar", "null", "q"]}


def _strategies():
    from hypothesis import strategies as st

    from ltm_core.run_guard import _leaves

    keys = sorted(_leaves(json.loads(json.dumps(OmegaConf_to_dict(compose([]))))))
    values = st.one_of(
        st.integers(-3, 300).map(str), st.sampled_from(["0", "-1", "10**12", "1e-9", "nan", "inf", "-inf", "1.5",
                                                        "true", "false", "null", "", "???", "${oops}", "[1,2]", "[]",
                                                        "{a:1}", "'x y'", "a=b", "日本", "..", "/nonexistent/x.txt"]),
        st.text(min_size=0, max_size=8))
    key = st.one_of(st.sampled_from(keys), st.sampled_from(["model.nope", "foo", "trainer", "+model.x", "~seed",
                                                             "data..path", ""]), st.text(max_size=6))
    override = st.one_of(st.tuples(key, values).map(lambda kv: f"{kv[0]}={kv[1]}"),
                         st.sampled_from(sorted(GROUPS)).flatmap(
                             lambda g: st.sampled_from(GROUPS[g]).map(lambda o: f"{g}={o}")),
                         st.sampled_from(["junk", "-x", "--nope", "model.hidden_size"]))
    return st.lists(override, min_size=1, max_size=3)


def OmegaConf_to_dict(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _outcome_ok(result) -> None:
    """Success (or the work reached), or exit 2 with one line; never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.stderr[-2000:])


FUZZ_EXAMPLES = int(os.environ.get("LTM_FUZZ_EXAMPLES", "12"))  # each runs the three commands; raise it for a soak


@pytest.fixture
def stand_ins(monkeypatch):
    """The work itself (training, evaluation) is tested elsewhere; here it is replaced once every check passed.
    Data is still loaded: a bad data path or file must give its line."""
    import ltm_core.evaluate
    import ltm_core.tasks.evaluate
    import ltm_core.train
    from ltm_core.data import load_corpus

    def fit(cfg, corpus=None):
        raise Reached()

    def evaluate(model, data, corpus=None, progress=None):
        load_corpus(data)
        raise Reached()

    def launch(cfg, world):
        raise Reached()

    monkeypatch.setattr(ltm_core.train, "fit", fit)
    monkeypatch.setattr(ltm_core.train, "_launch_local", launch)
    monkeypatch.setattr(ltm_core.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(ltm_core.tasks.evaluate, "evaluate_task", lambda *a, **k: (_ for _ in ()).throw(Reached()))


def test_fuzz_command_line(stand_ins, trained, tmp_path):
    """Random override keys, values and group choices for `ltm config show`, `ltm train` and `ltm eval`: every
    outcome is success or exit 2 with one line."""
    from hypothesis import HealthCheck, given, settings

    seen = {"examples": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_strategies())
    def check(overrides):
        seen["examples"] += 1
        _outcome_ok(cli("config", "show", *overrides))
        out = tmp_path / f"run{seen['examples']}"
        _outcome_ok(cli("train", *overrides, f"output_dir={out}"))
        _outcome_ok(cli("eval", "--checkpoint", str(trained), *[o for o in overrides if not o.startswith("output")]))

    check()
    record_figure(fuzz_examples=seen["examples"], commands=3 * seen["examples"])


def record_figure(**figures) -> None:
    path = os.environ.get("LTM_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": "fuzz", **figures}) + "\n")


# ----------------------------------------------------------------------- exact resume with randomness (issue #27)
PASSKEY_SMALL = ["experiment=passkey", "model.num_hidden_layers=1", "data.batch_size=2", "data.val_samples=4",
                 "trainer.val_check_interval=5", "trainer.log_every_n_steps=1", "trainer.progress=false",
                 "trainer.accelerator=cpu", "trainer.checkpoint_every_minutes=0", "optim.warmup_steps=3"]


def test_resume_with_select_noise_is_exact(tmp_path):
    """10 steps + 10 resumed steps == 20 steps, bitwise, with the select write's Gumbel noise on (experiment=passkey):
    the checkpoint carries the training steps' random stream. The same resume from a checkpoint stripped of that
    stream differs: the noise matters, and the stream is what makes the resume exact."""
    def run(out, *extra):
        return train(compose(PASSKEY_SMALL + [f"output_dir={out}", *extra]))

    straight = read_checkpoint(run(tmp_path / "a", "trainer.max_steps=20"))["state_dict"]
    first = run(tmp_path / "b", "trainer.max_steps=10", "optim.schedule_steps=20")
    stripped = torch.load(first, map_location="cpu", weights_only=True)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed = read_checkpoint(run(tmp_path / "b", "trainer.max_steps=20", "resume=auto"))["state_dict"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert stripped["global_step"] == 10 and stripped.pop("random_state")["torch"].dtype == torch.uint8
    torch.save(stripped, tmp_path / "c" / "checkpoints" / "last.ckpt")
    other = read_checkpoint(run(tmp_path / "c", "trainer.max_steps=20", "resume=auto"))["state_dict"]
    assert not all(torch.equal(straight[k], other[k]) for k in straight)


def test_checkpoints_are_also_saved_on_a_wall_clock_interval(tmp_path, text_file, monkeypatch, capfd):
    monkeypatch.setenv("LTM_SAVE_HOOK_PAUSE", "0")  # announce the saves
    train(_cfg(tmp_path / "run", text_file, "trainer.max_steps=12", "trainer.val_check_interval=100",
               "trainer.checkpoint_every_minutes=0.0001"))
    saves = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("ltm-save-hook written")
             and ln.endswith("last.ckpt")]
    assert len(saves) >= 6  # every step's end (the interval is 6 ms); without it, only the final save


def test_resume_auto_says_whether_it_found_a_checkpoint(tmp_path, text_file, capsys, monkeypatch):
    from rich.console import Console

    from ltm_core import lit

    # `ltm train`'s console at the width of ltm's piped output (rich fixed it at import from COLUMNS, which is 80 in
    # a pytest-xdist worker: the lines below, with their temporary paths, would wrap)
    monkeypatch.setattr(lit, "console", Console(width=int(PAGE_COLUMNS)))
    out = tmp_path / "run"
    train(_cfg(out, text_file, "trainer.max_steps=2", "resume=auto"))
    assert f"resume=auto: no checkpoint in {out / 'checkpoints'}; starting at step 0" in capsys.readouterr().out
    train(_cfg(out, text_file, "trainer.max_steps=3", "resume=auto"))
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt'} at step 2" in capsys.readouterr().out


def test_resume_command_rebuilds_the_config(tmp_path, text_file):
    """The command an interrupt prints for a Python-API run (no CLI overrides to repeat) composes the same config."""
    import shlex

    from omegaconf import OmegaConf

    from ltm_core.run_guard import resume_command

    cfg = compose(PASSKEY_SMALL + ["data=textfile", f"data.path={text_file}", "seed=7", "task.lengths=[96,384]",
                                   f"output_dir={tmp_path / 'a b'}", "optim.lr=0.001"])
    command = shlex.split(resume_command(cfg))
    assert command[:2] == ["ltm", "train"] and command[-2:] == [f"output_dir={tmp_path / 'a b'}", "resume=auto"]
    again = compose(command[2:])
    assert OmegaConf.to_container(again, resolve=True) == {**OmegaConf.to_container(cfg, resolve=True),
                                                           "resume": "auto"}


@pytest.mark.parametrize("override, key", [("trainer.max_bad_steps=0", "trainer.max_bad_steps"),
                                           ("trainer.checkpoint_every_minutes=-1", "trainer.checkpoint_every_minutes"),
                                           ("trainer.checkpoint_every_minutes=nan", "trainer.checkpoint_every_minutes")])
def test_reliability_settings_are_checked(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        compose([override])
