"""What `ltm train` prints: one progress line at 80 columns (optimizer steps of trainer.max_steps, also after a
resume), Lightning's messages after the bar instead of glued to it, none of its adverts and banners, the threads
line, and a `generate` command prompted with the run's own validation text."""

from __future__ import annotations

import io
import logging
import re
import warnings

import pytest
from rich.console import Console

from ltm_core import lit, train as train_module
from ltm_core.configuration import compose
from ltm_core.console import LIGHTNING_LOGGERS, generate_command
from ltm_core.tokenizer import ByteTokenizer, prompt_from

from support import TINY

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOISE = ("GPU available", "TPU available", "Tip:", "litlogger", "litmodels", "weights_only",
         "exists and is not empty", "Epoch")


def test_prompt_from_takes_the_first_words_of_a_document_or_line():
    tok = ByteTokenizer()
    assert prompt_from(tok.encode("Jude 1:1 Jude, the servant of Jesus Christ, and brother", bos=True)) \
        == "Jude 1:1 Jude, the servant of Jesus"
    assert prompt_from(tok.encode("ning of a word\nA whole line that is long enough to be cut")) \
        == "A whole line that is long enough to be"  # a split that starts mid-document: the next line
    assert prompt_from(tok.encode("short", bos=True, eos=True)) == "short"
    assert prompt_from(tok.encode("ünïcödé " * 10, bos=True), max_bytes=13) == "ünïcödé"  # never half a character
    assert generate_command("runs/a b/last.ckpt", tok.encode("it's here", bos=True)) \
        == "generate:   ltm generate --checkpoint 'runs/a b/last.ckpt' --prompt 'it'\"'\"'s here'"
    assert generate_command("last.ckpt", []) == "generate:   ltm generate --checkpoint last.ckpt"


@pytest.fixture
def screen(monkeypatch):
    """The run's console as an 80-column terminal, and Lightning's log lines written into the same stream."""
    out = io.StringIO()
    monkeypatch.setattr(lit, "console", Console(file=out, force_terminal=True, width=80,
                                                          color_system=None))
    handler = logging.StreamHandler(out)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in loggers:
        logger.addHandler(handler)
    yield out
    for logger in loggers:
        logger.removeHandler(handler)


def _frames(raw: str) -> list[str]:
    """The lines a terminal showed: every redraw of the live line, and the printed lines."""
    return [ANSI.sub("", part).rstrip() for part in re.split(r"[\r\n]", raw) if ANSI.sub("", part).strip()]


def test_progress_line_resume_and_clean_output(screen, tmp_path, capfd):
    corpus = tmp_path / "corpus.txt"
    lines = [f"line {i:03d} of the corpus, with words after it." for i in range(400)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    run = [*[o for o in TINY if o != "trainer.progress=false"], "data=textfile", f"data.path={corpus}",
           "trainer.threads=1", f"output_dir={out}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_module.train(compose(run + ["trainer.max_steps=6"]))
        first = screen.getvalue()
        screen.seek(0)
        screen.truncate()
        train_module.train(compose(run + ["trainer.max_steps=10", "resume=auto"]))
        second = screen.getvalue()
    terminal = first + second + capfd.readouterr().err
    for raw in (first, second):
        assert "\x1b[1A" not in raw  # the live region never grew past one line (no cursor-up redraws)
        bars = [f for f in _frames(raw) if f.startswith("step ")]
        assert bars and all(len(f) <= 80 for f in bars), [f for f in bars if len(f) > 80]
    bars = [f for f in _frames(first) if f.startswith("step ")]
    assert bars[0].startswith("step 0/6") and bars[-1].startswith("step 6/6") and "loss" in bars[-1]
    bars = [f for f in _frames(second) if f.startswith("step ")]
    assert re.match(r"step +6/10", bars[0]), bars[0]  # a resumed run starts where it stopped, of max_steps
    assert re.match(r"step +10/10", bars[-1]) and "val" in bars[-1], bars[-1]
    stopped = [f for f in _frames(second) if "Trainer.fit" in f]
    assert stopped == ["`Trainer.fit` stopped: `max_steps=10` reached."]  # its own line, after the bar
    assert second.index("Trainer.fit") > second.rindex("step 10/10")
    for noise in NOISE:
        assert noise not in terminal, noise
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert "threads: 1 per process" in first and "resuming from" in second
    command = next(f for f in _frames(second) if f.startswith("generate:"))
    prompt = command.split("--prompt ", 1)[1].strip("'")
    val_text = corpus.read_text()[-len(corpus.read_text()) // 10:]
    assert prompt and any(line.startswith(prompt) for line in val_text.splitlines()), prompt  # its own data
    for name in LIGHTNING_LOGGERS:  # the bar released its hold on Lightning's loggers
        assert not [f for f in logging.getLogger(name).filters if type(f).__name__ == "_Hold"]


def test_bar_holds_warnings_and_log_lines_until_it_stops(monkeypatch):
    """A warning or a Lightning log line raised while the bar draws is printed after it, not inside the line."""
    from types import SimpleNamespace

    from ltm_core.lit import StepProgressBar

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: out.write(f"WARNING {message}\n"))
    bar = StepProgressBar(Console(file=out, force_terminal=True, width=80, color_system=None))
    trainer = SimpleNamespace(max_steps=4, global_step=1, progress_bar_metrics={"train/loss": 2.0},
                              is_global_zero=True)
    try:
        bar.on_train_start(trainer, None)
        warnings.warn("a warning during training")
        logger.warning("a log line during training")
        trainer.global_step = 4
        bar.on_train_end(trainer, None)
    finally:
        logger.removeHandler(handler)
    text = ANSI.sub("", out.getvalue())
    last_bar = text.rindex("step 4/4")
    assert text.index("WARNING a warning during training") > last_bar
    assert text.index("a log line during training") > last_bar
    assert "\nWARNING a warning" in text or text.startswith("WARNING")  # at the start of a line
