"""`ltm train -m` sweeps when a job fails, and the line of a diverging run.

A sweep runs every job: a job's failure is one line naming the job, the sweep goes on, and one summary line ends it
(exit 2 when a job failed); what can be checked before any job starts (each job's config and data path) is; an
interrupt still stops the whole sweep. A diverging run names a checkpoint that exists, or says that none does, and its
command never repeats the learning rate that diverged; a validation whose loss is nan saves no best.ckpt.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from support import TINY, inject_nan, invoke
from ltm_core.errors import DataError, Interrupted

SHORT = ["trainer.max_steps=3", "trainer.val_check_interval=3", "data.val_samples=2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep-inputs") / "corpus.txt"
    path.write_text("the lord said unto him, go in peace. " * 400)
    return path


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_a_diverging_job_is_one_line_and_the_sweep_goes_on(tmp_path, text_file):
    sweep = tmp_path / "sw"
    result = invoke("train", "-m", *TINY, *SHORT, "data=textfile", f"data.path={text_file}", "optim.lr=1e9,1e-3",
                    f"output_dir={sweep}")
    assert result.returncode == 2, result.output[-3000:]
    errors = [ln for ln in _lines(result.stderr) if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert line.startswith("error: job 0 (optim.lr=1000000000.0): training diverged at step "), line
    summary = _lines(result.stderr)[-1]
    assert summary.startswith("2 jobs: 1 done, 1 failed (job 0: training diverged at step "), summary
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()  # job 1 (lr 1e-3) ran to its end

    # job 0 diverged before it saved last.ckpt; its one validation (val/bpb nan) saved no best.ckpt either
    assert not (sweep / "0" / "checkpoints" / "last.ckpt").exists()
    assert not (sweep / "0" / "checkpoints" / "best.ckpt").exists()
    assert "it saved no checkpoint to continue from: start again with a lower optim.lr: ltm train " in line
    command = shlex.split(line.split("start again with a lower optim.lr: ", 1)[1])
    assert not [o for o in command if o.startswith("optim.lr=") and o != "optim.lr=LOWER"], command
    assert "optim.lr=LOWER" in command and command[-2:] == [f"output_dir={sweep / '0'}", "overwrite=true"]
    # the command, with a lower lr in place of the placeholder, starts that job again in its folder
    rerun = invoke(*[o.replace("=LOWER", "=1e-3") for o in command[1:]])
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()


def test_a_missing_data_path_refuses_the_sweep_before_any_job_starts(tmp_path, text_file):
    sweep = tmp_path / "sw"
    missing = tmp_path / "nosuch.txt"
    result = invoke("train", "-m", *TINY, *SHORT, "data=textfile", f"data.path={text_file},{missing}",
                    f"output_dir={sweep}")
    assert result.returncode == 2, result.output[-3000:]
    line = f"error: job 1 (data.path={missing}): data error: {missing} does not exist; no job was started"
    assert _lines(result.output) == [line], result.output
    assert not sweep.exists()  # job 0's data was fine, and it did not start either


def _fake_train(monkeypatch, outcomes: list):
    """`ltm_core.train.train` replaced: each call (a job) raises the next of `outcomes` (None: the job succeeds)."""
    import ltm_core.train

    calls: list = []

    def train(cfg):
        calls.append(cfg.optim.lr)
        outcome = outcomes[len(calls) - 1]
        if outcome is not None:
            raise outcome
        return Path(cfg.output_dir) / "checkpoints" / "last.ckpt"

    monkeypatch.setattr(ltm_core.train, "train", train)
    return calls


SAVED = Interrupted("interrupted by SIGINT: saved step 4 to X/last.ckpt; continue with: ltm train", 2)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SAVED])
def test_an_interrupt_still_stops_the_whole_sweep(monkeypatch, tmp_path, interrupt):
    calls = _fake_train(monkeypatch, [interrupt, None, None])
    result = invoke("train", "-m", *TINY, "optim.lr=1e-3,2e-3,3e-3", f"output_dir={tmp_path / 'sw'}")
    assert result.returncode == 130 and calls == [1e-3], (calls, result.output[-3000:])
    assert _lines(result.stderr) == [str(interrupt) if isinstance(interrupt, Interrupted) else
                                     "interrupted before training started; nothing to save"], result.stderr


def test_each_kind_of_job_failure_is_counted_and_the_sweep_goes_on(monkeypatch, tmp_path):
    """A job's bad input (exit 2), a launched run whose worker failed (it printed its line; SystemExit 2) and a bug
    (its traceback; the sweep then exits 1)."""
    calls = _fake_train(monkeypatch, [DataError("data error: x.txt has 3 tokens; more"), SystemExit(2), None,
                                      RuntimeError("boom")])
    result = invoke("train", "-m", *TINY, "optim.lr=1e-3,2e-3,3e-3,4e-3", f"output_dir={tmp_path / 'sw'}")
    assert calls == [1e-3, 2e-3, 3e-3, 4e-3] and result.returncode == 1, result.output[-3000:]
    errors = [ln for ln in _lines(result.stderr) if ln.startswith("error:")]
    assert errors == ["error: job 0 (optim.lr=0.001): data error: x.txt has 3 tokens; more",
                      "error: job 1 (optim.lr=0.002): a training process stopped with exit code 2 (its line is above)",
                      "error: job 3 (optim.lr=0.004): RuntimeError: boom"], result.stderr
    assert "Traceback" in result.stderr
    assert _lines(result.stderr)[-1] == ("4 jobs: 1 done, 3 failed (job 0: data error: x.txt has 3 tokens; job 1: a "
                                         "training process stopped with exit code 2 (its line is above); job 3: "
                                         "RuntimeError: boom)")


def test_a_sweep_of_jobs_that_all_end_says_so(monkeypatch, tmp_path):
    _fake_train(monkeypatch, [None, None])
    result = invoke("train", "-m", *TINY, "optim.lr=1e-3,2e-3", f"output_dir={tmp_path / 'sw'}")
    assert result.returncode == 0, result.output[-3000:]
    assert _lines(result.stdout)[-1] == "2 jobs: 2 done" and result.stderr == ""


def test_divergence_after_a_best_checkpoint_but_before_last_names_no_missing_file(monkeypatch, tmp_path, text_file):
    """best.ckpt (saved at a validation) is no checkpoint resume=auto continues from: the line must not name a
    last.ckpt that was never written (it did, as `the last good checkpoint is .../last.ckpt (step 2)`)."""
    inject_nan(monkeypatch, None, after=3)  # steps 1-3 train; every later attempt is NaN
    out = tmp_path / "run"
    result = invoke("train", *TINY, "data=textfile", f"data.path={text_file}", "trainer.max_steps=20",
                    "trainer.val_check_interval=2", "trainer.save_every_n_steps=50",
                    "trainer.checkpoint_every_minutes=0", "optim.lr=2e-3", f"output_dir={out}")
    assert result.returncode == 2, result.output[-3000:]
    line = _lines(result.stderr)[-1]
    assert line.startswith("error: training diverged at step 4: "), line
    assert (out / "checkpoints" / "best.ckpt").is_file() and not (out / "checkpoints" / "last.ckpt").exists()
    assert "last.ckpt" not in line and "it saved no checkpoint to continue from" in line, line
    assert "optim.lr=2e-3" not in line and line.endswith(f"optim.lr=LOWER output_dir={out} overwrite=true"), line
