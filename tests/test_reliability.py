"""Reliability (docs/reliability.md): a run killed at any moment resumes exactly; SIGINT/SIGTERM save and say how to go
on; a diverging loss stops with the last good checkpoint intact; one run per folder; damaged and hostile files give one
line; a full disk loses nothing. Each test is a row of the table in docs/reliability.md."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
import torch

from kill_harness import Run, Zygote, checkpoint_step, losses, soak
from support import TINY

# ------------------------------------------------------------------------------------------------ the runs
# The passkey recipe (select write, Gumbel noise 0.5 in training), shrunk to 1 layer and batches of 2.
PASSKEY = ["experiment=passkey", "model.num_hidden_layers=1",
           "data.batch_size=2", "data.val_samples=4", "trainer.log_every_n_steps=1", "trainer.progress=false",
           "trainer.accelerator=cpu"]


def variant_args(name: str, corpus: Path, kills: int = 10) -> tuple[list[str], int, int]:
    """(overrides, processes, saves a kill waits for at most) of a kill-test run; its length grows with the kills
    (a kill lets the run advance by at most that many saves, and the run must outlast the kills)."""
    text = ["data=textfile", f"data.path={corpus}"]
    single = [f"trainer.max_steps={75 * kills // 10}", "trainer.val_check_interval=3",
              "trainer.checkpoint_every_minutes=0.01"]
    native = ["parallel=tp2", "model.kernels=torch", f"trainer.max_steps={30 * kills // 10}",
              "trainer.val_check_interval=2", "trainer.checkpoint_every_minutes=0"]
    if name == "default":  # the default model, shrunk
        return TINY + text + single, 1, 2
    if name == "select_noise":
        return PASSKEY + single, 1, 2
    if name == "tp2_select_noise":  # native tensor parallel (corpus data: task data is not supported there)
        return PASSKEY + text + native, 2, 1
    if name == "tp2_default":
        return TINY + text + native, 2, 1
    raise KeyError(name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the of and to in that he shall unto for his lord they be is him not them it with all thou".split()
    path = tmp_path_factory.mktemp("reliability-data") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500)))
    return path


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference(zygote, corpus, tmp_path_factory):
    """Uninterrupted runs, made once per variant."""
    root, made = tmp_path_factory.mktemp("reference"), {}

    def get(name: str, kills: int = 10) -> Path:
        if (name, kills) not in made:
            args, ranks, _ = variant_args(name, corpus, kills)
            out = root / f"{name}-{kills}"
            run = Run.start(zygote, "train", [*args, f"output_dir={out}"], root / f"{name}-{kills}.log", ranks)
            assert run.wait() == [0] * ranks, run.text()[-3000:]
            made[name, kills] = out
        return made[name, kills]

    return get


def assert_same_run(reference: Path, run: Path) -> None:
    """Bitwise the same final weights and optimizer state, and every step's loss logged once, as the reference."""
    a = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a.get("optimizer_states", []), b.get("optimizer_states", [])):
        for i, st in sa["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[key], sb["state"][i][key]), (i, key)
    assert losses(run) == losses(reference)


def record(name: str, **figures) -> None:
    """Figures for docs/reliability.md, when LTM_RELIABILITY_FIGURES names a JSON-lines file."""
    path = os.environ.get("LTM_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


# ------------------------------------------------------------------------------------------ 1. kill anywhere
def _kill_test(zygote, reference, corpus, tmp_path, name: str, kills: int, seed: int) -> None:
    args, ranks, max_saves = variant_args(name, corpus, kills)
    out = tmp_path / "run"
    result = soak(zygote, args, out, kills=kills, seed=seed, ranks=ranks, max_saves=max_saves)
    assert result.kills >= kills
    assert sum(result.in_save.values()) >= 3, result  # several of them inside a checkpoint save
    assert_same_run(reference(name, kills), out)
    record(f"kill/{name}", kills=result.kills, in_save=dict(result.in_save), restarts=result.restarts + 1,
           steps=checkpoint_step(out), steps_lost=0)


@pytest.mark.parametrize("name", ["default", "select_noise", "tp2_select_noise"])
def test_sigkill_at_any_moment_then_resume_is_exact(zygote, reference, corpus, tmp_path, name):
    """10 SIGKILLs at moments drawn from the run's progress (inside saves, inside steps, during start-up), each
    followed by resume=auto: the final weights, optimizer state and loss curve are bitwise those of an
    uninterrupted run, also with the select write's noise and under tensor parallelism."""
    _kill_test(zygote, reference, corpus, tmp_path, name, kills=10, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default", "select_noise", "tp2_select_noise", "tp2_default"])
def test_sigkill_soak(zygote, reference, corpus, tmp_path, name):
    _kill_test(zygote, reference, corpus, tmp_path, name, kills=int(os.environ.get("LTM_SOAK_KILLS", "50")), seed=11)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("ltm-save-hook ")]
    return lines[-1] if lines else ""


def _wait_for(predicate, run: Run, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert not run.finished(), run.text()[-3000:]
        assert time.monotonic() < deadline, run.text()[-3000:]
        time.sleep(0.01)


def test_sigint_saves_the_current_step_and_the_printed_command_resumes_exactly(zygote, reference, corpus, tmp_path):
    """`ltm train` + SIGINT: exit 130, one line naming the checkpoint and the exact command; the checkpoint holds
    every step done (none lost), and that command finishes the run bitwise like an uninterrupted one."""
    args, _, _ = variant_args("default", corpus)
    out = tmp_path / "run"
    run = Run.start(zygote, "start", ["train", *args, f"output_dir={out}"], tmp_path / "a.log")
    _wait_for(lambda: (out / "checkpoints" / "last.ckpt").exists(), run)
    time.sleep(0.3)
    run.signal(signal.SIGINT)
    assert run.wait() == [130], run.text()[-3000:]
    assert "Traceback" not in run.text()
    line = _last_line(run.text())
    match = re.fullmatch(r"interrupted by SIGINT: saved step (\d+) to (\S+); continue with: (ltm train .*)", line)
    assert match, line
    step = int(match.group(1))
    assert Path(match.group(2)) == out / "checkpoints" / "last.ckpt" and checkpoint_step(out) == step
    assert losses(out) == losses(reference("default"))[:step]  # every step done is in the checkpoint and the log
    command = shlex.split(match.group(3))
    assert command[-1] == "resume=auto"
    resumed = Run.start(zygote, "start", command[1:], tmp_path / "b.log")
    assert resumed.wait() == [0], resumed.text()[-3000:]
    assert "resuming from" in resumed.text()
    assert_same_run(reference("default"), out)


def test_sigterm_on_native_ranks_saves_and_resumes_exactly(zygote, reference, corpus, tmp_path):
    """SIGTERM to every rank of a tp2 run (as a scheduler sends it): both save the same step, exit 143, rank 0
    prints the one line; resume=auto ends like an uninterrupted run."""
    args, ranks, _ = variant_args("tp2_select_noise", corpus)
    out = tmp_path / "run"
    run = Run.start(zygote, "train", [*args, f"output_dir={out}"], tmp_path / "a.log", ranks)
    _wait_for(lambda: (out / "checkpoints" / "last.ckpt").exists(), run)
    run.signal(signal.SIGTERM)
    assert run.wait() == [143, 143], run.text()[-3000:]
    rank0, rank1 = (lg.read_text() for lg in run.logs)
    assert _last_line(rank0).startswith("interrupted by SIGTERM: saved step") and "interrupted" not in rank1
    resumed = Run.start(zygote, "train", [*args, f"output_dir={out}", "resume=auto"], tmp_path / "b.log", ranks)
    assert resumed.wait() == [0, 0], resumed.text()[-3000:]
    assert_same_run(reference("tp2_select_noise"), out)


def test_ctrl_c_of_a_launched_multiprocess_run_stops_every_worker_with_one_line(zygote, reference, corpus, tmp_path):
    """`ltm train parallel=tp2` starts its workers itself (torch's elastic launcher); Ctrl-C (SIGINT to the process
    group, as a terminal sends it) stops every worker at one saved step with one line, no traceback, exit 130."""
    args, ranks, _ = variant_args("tp2_select_noise", corpus)
    out = tmp_path / "run"
    run = Run.start(zygote, "start", ["train", *args, f"output_dir={out}"], tmp_path / "a.log")
    _wait_for(lambda: (out / "checkpoints" / "last.ckpt").exists(), run, timeout=240)
    run.signal(signal.SIGINT, group=True)
    assert run.wait() == [130], run.text()[-3000:]
    text = run.text()
    after = text[text.index("ltm train ->"):]
    assert [ln for ln in after.splitlines() if "interrupted" in ln] == [_last_line(text)], text[-3000:]
    assert "Traceback" not in text and "Sending process" not in text and "SignalException" not in text
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == run.pids[0]]
    assert alive == [], "workers left running"
    command = shlex.split(_last_line(text).split("continue with: ")[1])
    resumed = Run.start(zygote, "train", command[2:], tmp_path / "b.log", ranks)  # the same config, torchrun-style
    assert resumed.wait() == [0, 0], resumed.text()[-3000:]
    assert_same_run(reference("tp2_select_noise"), out)


def _pgid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return -1
