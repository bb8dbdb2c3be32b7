"""What `ltm train` shows while Lightning runs: one progress line, and none of Lightning's adverts and banners.

`quiet_lightning()` drops Lightning's tips (litlogger, litmodels), its accelerator banners (`GPU available`, `TPU
available`, `LOCAL_RANK ... CUDA_VISIBLE_DEVICES`), its two restore lines (ltm prints `resuming from ...`) and the
`Checkpoint directory ... exists and is not empty` warning of a resumed run (ltm refuses to reuse a folder unless
resume=auto or overwrite=true: that folder is expected). Everything else Lightning says still prints.

`StepProgressBar` counts optimizer steps (trainer.global_step of trainer.max_steps, so a resumed run starts where
it stopped), fits one line at 80 columns (the metrics column is cut before the line wraps), and holds Lightning's
log lines and Python warnings while it draws, printing them after it stops instead of gluing them to the bar.
"""

from __future__ import annotations

import logging
import shlex
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from ltm_core.tokenizer import prompt_from

# the loggers Lightning's rank_zero_info / rank_zero_warn and its accelerators write to
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.accelerators.cuda", "lightning.pytorch", "lightning.fabric")
NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "IPU available:", "LOCAL_RANK:",
         "Restoring states from the checkpoint", "Restored all states from the checkpoint")  # ltm says "resuming from"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NOISE)


_DROP = _DropNoise()


def quiet_lightning() -> None:
    """Silence Lightning's adverts, banners and the resume warning (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        if _DROP not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_DROP)
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")


class _Hold(logging.Filter):
    """Keeps Lightning's records while the bar is live; `release` re-emits them in order."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[logging.Logger, logging.LogRecord]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append((logging.getLogger(record.name), record))
        return False


def _format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    if "train/loss" in metrics:
        parts.append(f"loss {float(metrics['train/loss']):.3f}")
    if "val/loss" in metrics:
        parts.append(f"val {float(metrics['val/loss']):.3f}")
    if "train/tokens_per_s" in metrics:
        parts.append(f"{float(metrics['train/tokens_per_s']):,.0f} tok/s")
    return "  ".join(parts)


class StepProgressBar(ProgressBar):
    """One rich line: `step 120/600 ━━━━━━ 0:00:31 0:02:04 loss 2.413  val 2.51  5,210 tok/s`."""

    def __init__(self, console: Optional[Console] = None) -> None:
        super().__init__()
        self.console = console
        self._enabled = True
        self._progress: Optional[Progress] = None
        self._task = None
        self._hold: Optional[_Hold] = None
        self._warnings: list[tuple[Any, ...]] = []
        self._showwarning: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _start(self, trainer) -> None:
        self._progress = Progress(
            TextColumn("step", table_column=Column(no_wrap=True)),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[metrics]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=4)),
            console=self.console, expand=True, redirect_stdout=True, redirect_stderr=True)
        total = max(int(trainer.max_steps), int(trainer.global_step))
        self._task = self._progress.add_task("train", total=total, completed=int(trainer.global_step), metrics="")
        self._hold = _Hold()
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).addFilter(self._hold)
        self._showwarning, self._warnings = warnings.showwarning, []
        warnings.showwarning = lambda *args, **kwargs: self._warnings.append((args, kwargs))
        self._progress.start()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._hold is not None:
            hold, self._hold = self._hold, None
            for name in LIGHTNING_LOGGERS:
                logging.getLogger(name).removeFilter(hold)
            for logger, record in hold.held:
                logger.handle(record)  # through the logger's remaining filters (the noise filter) and handlers
        if self._showwarning is not None:
            show, self._showwarning = self._showwarning, None
            warnings.showwarning = show
            for args, kwargs in self._warnings:
                show(*args, **kwargs)

    def _update(self, trainer, note: str = "") -> None:
        if self._progress is None:
            return
        metrics = _format_metrics(trainer.progress_bar_metrics)
        self._progress.update(self._task, completed=int(trainer.global_step),
                              metrics=f"{note}  {metrics}" if note else metrics)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero:
            self._start(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._update(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        totals = trainer.num_val_batches if trainer.state.fn == "fit" else trainer.num_sanity_val_batches
        total = totals[dataloader_idx] if dataloader_idx < len(totals) else float("inf")
        self._update(trainer, f"val {batch_idx + 1}/{total}" if total != float("inf") else "validating")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._update(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._update(trainer)
        self._stop()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()


def generate_command(checkpoint: Path, val_ids: Iterable[int]) -> str:
    """The `ltm generate` line printed after a run, prompted with the first words of its own validation data."""
    prompt = prompt_from(val_ids)
    command = f"generate:   ltm generate --checkpoint {shlex.quote(str(checkpoint))}"
    return command + (f" --prompt {shlex.quote(prompt)}" if prompt else "")
