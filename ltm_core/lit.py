"""Training with Lightning: what `ltm_core.train.fit` runs for every preset but the native-parallel ones.

Everything that imports Lightning lives here (and in the Trainer API, `ltm_core.trainer`), so that generation,
evaluation, benchmarks, quantization, export and the native-parallel ranks start without it (its import is most of
a CLI call's start-up time):
- `TitanLightning`: the LightningModule, with manual optimization so that each BPTT window gets its own backward
  (`ltm_core.training.windowed_backward`);
- `AtomicCheckpointIO` and `GuardCallback`: Lightning's side of `ltm_core.run_guard` (atomic checked checkpoints,
  saves on signals and on a wall-clock interval);
- `StepProgressBar`: one progress line; it counts optimizer steps (trainer.global_step of trainer.max_steps, so a
  resumed run starts where it stopped), fits one line at 80 columns (the metrics column is cut before the line
  wraps), and holds Lightning's log lines and Python warnings while it draws, printing them after it stops;
- `fit_lightning`: the Trainer, its callbacks and loggers, and the lines a run prints.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from ltm_core import run_guard
from ltm_core.config import DataConfig, OptimConfig, TitanConfig
from ltm_core.configuration import to_dict
from ltm_core.console import LIGHTNING_LOGGERS, generate_command, quiet_lightning
from ltm_core.data import Corpus, load_corpus, unigram_bpb
from ltm_core.datamodule import TextDataModule
from ltm_core.errors import CheckpointError, Interrupted
from ltm_core.model import TitanModel
from ltm_core.resources import cpu_budget
from ltm_core.run_guard import (Interrupts, TrainingStream, add_missing_metrics_row, atomic_save, check_rng_state,
                                drop_metrics_from, is_rank_zero)
from ltm_core.tasks.datamodule import TaskDataModule, task_config
from ltm_core.parallel.layout import devices_per_node
from ltm_core.train import resume_path
from ltm_core.training import LN2, Diverged, build_optimizer, build_scheduler, rebase_lr, windowed_backward

console = Console()
# Lightning notes that do not apply: checkpoints are taken after the optimizer step on purpose (manual
# optimization with one backward per BPTT window), and a torch pytree deprecation inside Lightning itself.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


# ------------------------------------------------------------------------------------------ the LightningModule
class TitanLightning(L.LightningModule):
    """Lightning wrapper: manual optimization so that each BPTT window gets its own backward.

    A step whose loss or gradient is not finite is skipped (no optimizer or schedule step, the batch is dropped; the
    count is logged as train/bad_steps); `trainer.max_bad_steps` of them in a row raise `Diverged`. The random numbers
    the steps draw come from a `TrainingStream` that checkpoints carry (exact resume with select noise)."""

    def __init__(self, config: dict[str, Any], model: Optional[TitanModel] = None):
        """`model`: train this model (its weights are the start, e.g. `Trainer(model=...)`); None: a new one."""
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.run_config = config
        self.model = model if model is not None else TitanModel(TitanConfig.from_dict(config["model"]))
        self.optim_cfg = OptimConfig(**config["optim"])
        self.max_steps = int(self.optim_cfg.schedule_steps or config["trainer"]["max_steps"])
        self.accumulate = int(config["trainer"]["accumulate_grad_batches"])
        self.model.aux_weight = 1.0 / self.accumulate  # the writes' auxiliary losses, scaled as the token loss
        self.automatic_optimization = False
        self.samples_seen = 0  # per rank; restored on resume so the data continues where it stopped
        self.max_bad_steps = int(config["trainer"].get("max_bad_steps", 3))
        self.bad_steps = 0  # skipped steps of the whole run (restored on resume)
        self.resume_from: Optional[Path] = None  # the checkpoint fit_lightning resumes from (announced on load)
        self.bad_in_a_row = 0
        self._bad_window = False  # a micro-batch of the current step had a non-finite loss
        # fp16-mixed: the GradScaler skips steps with inf gradients itself (and lowers its scale): only the loss counts
        self._check_grads = config["precision"]["lightning"] != "16-mixed"
        self.random_stream = TrainingStream()
        self._tick: Optional[float] = None

    def forward(self, input_ids: torch.Tensor, memory=None):
        return self.model(input_ids, memory=memory)

    def on_train_start(self) -> None:
        # a model handed over in eval mode (`Trainer(model=...)` after an InferenceEngine put it there) trains as a
        # fresh one does: its memory's training noise and auxiliary losses on (Lightning keeps modules' modes)
        self.model.train()
        replaced = rebase_lr(self.lr_schedulers(), self.optim_cfg.lr)  # a resume with another optim.lr takes it
        if replaced is not None and self.trainer.is_global_zero:
            console.print(f"optim.lr={self.optim_cfg.lr:g} from step {self.trainer.global_step} (the checkpoint's "
                          f"schedule had {replaced:g})")

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx: int):
        input_ids, labels = batch  # [B, L] each
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        if self._tick is None:
            self._tick = time.perf_counter()
        with self.random_stream.active(self.device):
            loss, aux = windowed_backward(self.model, input_ids, labels, self.manual_backward, 1.0 / self.accumulate)
        self._bad_window |= not bool(torch.isfinite(loss))
        self.samples_seen += input_ids.shape[0]
        micro_step = self.samples_seen // input_ids.shape[0]
        if micro_step % self.accumulate == 0:
            bad = self._bad_window or (self._check_grads and not self._grads_finite())
            self._bad_window = False
            if self.trainer.strategy.reduce_boolean_decision(bad, all=False):  # every rank skips together
                optimizer.zero_grad(set_to_none=True)
                self.bad_steps += 1
                self.bad_in_a_row += 1
                if self.bad_in_a_row >= self.max_bad_steps:
                    raise Diverged(self.trainer.global_step + 1, self.bad_in_a_row)
            else:
                self.bad_in_a_row = 0
                if self.optim_cfg.grad_clip > 0:
                    # fp16-mixed: the gradients still carry the loss scale here (the plugin unscales them inside
                    # optimizer.step()), so the threshold is scaled alike: the unscaled norm is clipped at grad_clip
                    scaler = getattr(self.trainer.precision_plugin, "scaler", None)
                    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
                    self.clip_gradients(optimizer, gradient_clip_val=self.optim_cfg.grad_clip * scale,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        now = time.perf_counter()
        tokens_per_s = input_ids.numel() * self.trainer.world_size / max(now - self._tick, 1e-9)
        self._tick = now
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over data-parallel ranks
        self.log("train/tokens_per_s", tokens_per_s, prog_bar=True)
        self.log("train/lr", scheduler.get_last_lr()[0])
        self.log("train/bad_steps", float(self.bad_steps))
        if aux is not None:  # the memory's auxiliary loss (e.g. the tokens memory's importance penalty)
            self.log("train/aux_loss", aux, sync_dist=True)
        return loss

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def validation_step(self, batch, batch_idx: int):
        input_ids, labels = batch
        out = self.model(input_ids, labels=labels)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log("val/bpb", out.loss / LN2, prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["samples_seen"] = self.samples_seen
        checkpoint["bad_steps"] = self.bad_steps
        if self.random_stream.state is not None:
            checkpoint["random_state"] = self.random_stream.state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.samples_seen = int(checkpoint.get("samples_seen", 0))
        self.bad_steps = int(checkpoint.get("bad_steps", 0))
        self.restored_step = int(checkpoint.get("global_step", 0))  # fit_lightning: a resume with nothing to train
        if self.resume_from is not None and is_rank_zero():
            console.print(f"resuming from {self.resume_from} at step {self.restored_step}")
        # a checkpoint from before random states were saved: the stream starts from the global state, as seeded
        self.random_stream.state = checkpoint.get("random_state")


def check_resumable(ckpt: dict[str, Any], module: TitanLightning, path: Path) -> None:
    """A checkpoint that `module` can resume from: the weights' names, shapes and dtypes, the AdamW state's shapes
    and the random state. One CheckpointError line otherwise (Lightning would raise deep inside its restore)."""
    from ltm_core.checkpoint import check_tensors

    check_tensors(ckpt["state_dict"], module.state_dict(), path)
    params = [p for g in build_optimizer(module.model, module.optim_cfg).param_groups for p in g["params"]]
    states = ckpt.get("optimizer_states")
    groups = states[0].get("param_groups") if isinstance(states, list) and states and isinstance(states[0], dict) else None
    if (not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups)
            or sum(len(g.get("params", ())) for g in groups) != len(params)):
        hparams = ckpt.get("hyper_parameters")
        config = hparams.get("config") if isinstance(hparams, dict) else None
        parallel = config.get("parallel") if isinstance(config, dict) else None
        preset = parallel.get("name") if isinstance(parallel, dict) else None
        dcp_dir = path.parent / "dcp"
        if states is None and ("dcp_checkpoint" in ckpt or dcp_dir.is_dir()
                               or (isinstance(parallel, dict) and parallel.get("strategy") == "native")):
            # the consolidated weights of a native-parallel run: its optimizer state is sharded under dcp/
            raise CheckpointError(f"checkpoint error: {path} is the consolidated checkpoint of a native-parallel run"
                                  f"{f' (parallel={preset})' if isinstance(preset, str) else ''}, whose optimizer "
                                  f"state is in {dcp_dir}/ and resumes on native-parallel presets only, not "
                                  f"parallel=single: continue it with such a preset, or train from its weights in a "
                                  f"new folder (output_dir=NEW resume={path})")
        raise CheckpointError(f"checkpoint error: {path} holds no optimizer state for this model")
    for index, state in (states[0].get("state") or {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(state, dict):
            raise CheckpointError(f"checkpoint error: {path}: optimizer state {index!r} belongs to no parameter")
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if not isinstance(t, torch.Tensor) or t.shape != params[index].shape or not t.is_floating_point():
                raise CheckpointError(f"checkpoint error: {path}: optimizer state {key} of parameter {index} does "
                                      f"not fit the model (shape {list(params[index].shape)})")
    if "random_state" in ckpt:
        check_rng_state(ckpt["random_state"], str(path))


# ---------------------------------------------------------------------------------- checkpoints and signals
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic, fsynced writes (`atomic_save`) and checked reads: `torch.load` with
    `weights_only=True` (a pickled object that would run code is refused), then `check(ckpt, path)` (tensor names,
    shapes and dtypes against the model being trained), each failure one CheckpointError line."""

    def __init__(self, check: Optional[Callable[[dict, Path], None]] = None):
        super().__init__()
        self.check = check

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from ltm_core.checkpoint import read_checkpoint

        ckpt = read_checkpoint(path)
        if self.check is not None:
            self.check(ckpt, Path(path))
        return ckpt


class GuardCallback(Callback):
    """Saves OUTPUT_DIR/checkpoints/last.ckpt after an optimizer step when a signal came (then stops the run) or when
    `every_minutes` of training passed since the last save. Every rank takes the same decision (one all-reduce of a
    flag per batch in a multi-process run). Saves land on optimizer-step boundaries only, never inside gradient
    accumulation (which Lightning's own `train_time_interval` does not know about under manual optimization)."""

    def __init__(self, last: Path, interrupts: Interrupts, every_minutes: Optional[float], accumulate: int):
        self.last, self.interrupts, self.accumulate = Path(last), interrupts, accumulate
        self.interval = 60.0 * every_minutes if every_minutes else None
        self._last_save = time.monotonic()
        self.saved_step: Optional[int] = None  # global step of this run's newest last.ckpt (written; best.ckpt not)
        self.stopped_at: Optional[int] = None  # global step at which a signal stopped the run

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Record each save of last.ckpt, the file resume=auto continues from, once it is written: Lightning's
        `on_save_checkpoint` hook runs before the file is written, and for best.ckpt too (a validation's save),
        which resume=auto does not read and a diverging run's message must not name."""
        save = trainer.save_checkpoint
        if getattr(save, "guard", None) is self:
            return

        def save_checkpoint(filepath, *args, **kwargs):
            save(filepath, *args, **kwargs)
            if Path(filepath).resolve() == self.last.resolve():
                self.saved_step = trainer.global_step
                self._last_save = time.monotonic()  # checkpoint_every_minutes counts from the last last.ckpt

        save_checkpoint.guard = self
        trainer.save_checkpoint = save_checkpoint

    def on_train_start(self, trainer, pl_module) -> None:
        self.interrupts.install()  # over Lightning's own SIGTERM handler, registered when fit started
        self._last_save = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        micro = pl_module.samples_seen // max(1, batch[0].shape[0])
        if micro % self.accumulate:
            return
        due = self.interval is not None and time.monotonic() - self._last_save >= self.interval
        signalled = trainer.strategy.reduce_boolean_decision(self.interrupts.requested, all=False)
        if signalled or trainer.strategy.reduce_boolean_decision(due, all=False):
            trainer.save_checkpoint(self.last, weights_only=False)
        if signalled:
            self.stopped_at = trainer.global_step
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """metrics.csv must hold every step the checkpoint holds: the rows Lightning buffers are written now, and
        this step's row, which Lightning logs only after the batch-end hooks that save, travels in the checkpoint."""
        for logger in trainer.loggers:
            logger.save()
        # the logging step: one per micro-batch (manual optimization), not yet advanced past this batch
        logged = trainer.fit_loop.epoch_loop._batches_that_stepped
        checkpoint["metrics_row"] = {"step": logged, **{
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.is_global_zero and trainer.loggers:
            path = Path(trainer.loggers[0].log_dir) / "metrics.csv"
            row = checkpoint.get("metrics_row")
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] >= 0:
                drop_metrics_from(path, row["step"] + 1)
                add_missing_metrics_row(path, row)
            else:  # a checkpoint without the row: one logging step per optimizer step
                drop_metrics_from(path, int(checkpoint.get("global_step", 0)))


# ---------------------------------------------------------------------------------------------- progress
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


# --------------------------------------------------------------------------------------------------- fit
class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to OUTPUT_DIR/metrics.csv instead of deleting it, and
    that it writes no hparams.yaml: OUTPUT_DIR/config.yaml is the run's config, written before training starts."""

    def log_hyperparams(self, params=None) -> None:
        pass

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):  # keep the earlier rows and their columns
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class BestCheckpoint(ModelCheckpoint):
    """best.ckpt: the lowest val/loss so far, never a non-finite one (Lightning keeps the first value it sees, nan
    included, and ranks nan as inf only once it has another to compare with)."""

    def check_monitor_top_k(self, trainer, current=None) -> bool:
        # every rank logs the same val/loss (sync_dist), so all decide alike before any collective
        return current is not None and bool(torch.isfinite(current)) and super().check_monitor_top_k(trainer, current)


def _fit_guarded(cfg: DictConfig, trainer: L.Trainer, module: TitanLightning, datamodule, ckpt_path: Optional[str],
                 guard: GuardCallback) -> None:
    """trainer.fit, with the one line of a run that stopped early: which checkpoint holds its work, how to go on."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SIGTERM before training started reached Lightning's handler too; we saved
        if guard.stopped_at is None:
            raise
    except Diverged as err:
        last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"  # best.ckpt does not count: resume=auto reads last
        err.args = (f"{err}; {run_guard.diverged_advice(cfg, last, guard.saved_step, ckpt_path)}",)
        raise
    except run_guard.SaveFailed as err:
        err.args = (f"{err}; the run stopped: free space, then continue with: {run_guard.resume_command(cfg)}",)
        raise
    except OSError as err:  # another file of the run (metrics.csv, hparams.yaml) could not be written
        if err.filename is None:
            raise
        raise run_guard.SaveFailed(
            f"output error: cannot write {err.filename} ({err.strerror}); the checkpoints in "
            f"{Path(cfg.output_dir) / 'checkpoints'} are intact; the run stopped: free space, then continue with: "
            f"{run_guard.resume_command(cfg)}") from None


def fit_lightning(cfg: DictConfig, threads: int, corpus: Optional[Corpus] = None,
                  datamodule: Optional[L.LightningDataModule] = None, model: Optional[TitanModel] = None) -> Path:
    """`ltm_core.train.fit` with Lightning (every preset but the native-parallel ones); `threads`: the torch threads
    this process was given."""
    quiet_lightning()
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data_cfg = DataConfig(**to_dict(cfg.data))
    task_cfg = task_config(cfg)  # data=<task> (ltm_core.tasks): generated samples instead of a corpus
    if datamodule is not None:
        corpus = None
    elif task_cfg is not None:
        corpus, datamodule = None, TaskDataModule(data_cfg, task_cfg, int(cfg.model.segment_length))
    else:
        corpus = corpus if corpus is not None else load_corpus(data_cfg)
        datamodule = TextDataModule(data_cfg, corpus)
    validates = getattr(datamodule, "has_validation", True)
    module = TitanLightning(to_dict(cfg), model=model)
    ckpt_path = resume_path(cfg, out)
    module.resume_from = ckpt_path
    interrupts = run_guard.Interrupts()

    model = module.model
    rank_zero = is_rank_zero()
    if rank_zero:
        console.print(f"[bold]ltm train[/] -> {out}")
        if corpus is None:  # task data, or the Trainer API's datasets
            console.print(f"data: {datamodule.describe()}")
        else:
            console.print(f"data: {corpus.description}; train {len(corpus.train):,} tokens, val {len(corpus.val):,}")
        console.print(f"model: {model.num_parameters():,} parameters, "
                      f"{model.flops_per_token(data_cfg.seq_len) / 1e6:.2f} MFLOP/token (6N + attention + memory), "
                      f"memory={'on' if model.config.use_memory else 'off'}, segment={model.config.segment_length}, "
                      f"bptt_segments={model.config.bptt_segments}")
        cpus = cpu_budget().describe(threads)
        console.print(f"threads: {threads} per process ({cpus}; trainer.threads sets it)", soft_wrap=True)
        if not ckpt_path and cfg.resume == "auto":  # a resume is announced with its step, once Lightning read it
            console.print(f"resume=auto: no checkpoint in {ckpt_dir}; starting at step 0")

    accumulate = int(cfg.trainer.accumulate_grad_batches)
    interval = int(cfg.trainer.val_check_interval)
    save_every = int(cfg.trainer.save_every_n_steps or interval)
    guard = GuardCallback(ckpt_dir / "last.ckpt", interrupts, cfg.trainer.checkpoint_every_minutes,
                                    accumulate)
    callbacks = [
        guard,
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=save_every, save_top_k=1,
                        enable_version_counter=False),
    ]

    if validates:
        callbacks.insert(1, BestCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min",
                                           save_top_k=1, enable_version_counter=False))
    if cfg.trainer.progress:
        callbacks.append(StepProgressBar(console))
    loggers = [ResumableCSVLogger(save_dir=str(out), name="", version="")]
    if cfg.trainer.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    strategy = cfg.parallel.strategy
    if strategy == "ddp" and model.config.use_memory and getattr(model.config.memory, "kind", "tokens") != "tokens":
        # each window has its own backward: windows after the first do not use the learned initial memory, and
        # with bptt_segments=1 no window uses the memory-write weights (every write is detached). The tokens memory
        # (measured per kind: every parameter has a gradient after each window's backward) needs no search, whose
        # `find_unused_parameters=True ... did not find any unused parameters` warning each rank would print
        strategy = "ddp_find_unused_parameters_true"
    trainer = L.Trainer(
        max_steps=int(cfg.trainer.max_steps), max_epochs=-1, accelerator=cfg.trainer.accelerator,
        devices=devices_per_node(cfg), num_nodes=int(cfg.parallel.num_nodes), strategy=strategy,
        precision=cfg.precision.lightning, val_check_interval=interval * accumulate, check_val_every_n_epoch=None,
        log_every_n_steps=int(cfg.trainer.log_every_n_steps), callbacks=callbacks, logger=loggers,
        enable_progress_bar=bool(cfg.trainer.progress), enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=bool(cfg.trainer.deterministic), use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO(lambda ckpt, path: check_resumable(ckpt, module, path))],
        limit_val_batches=None if validates else 0,
    )
    last = ckpt_dir / "last.ckpt"
    if rank_zero and not ckpt_path:  # rows of a run killed before its first checkpoint are logged again
        run_guard.drop_metrics_from(out / "metrics.csv", 0)
    with interrupts:  # from here SIGINT/SIGTERM save at the end of the current step (GuardCallback)
        _fit_guarded(cfg, trainer, module, datamodule, ckpt_path, guard)
    restored = getattr(module, "restored_step", None)
    if rank_zero and restored is not None and trainer.global_step == restored >= int(cfg.trainer.max_steps):
        console.print(f"note: the checkpoint is at step {restored} of trainer.max_steps={int(cfg.trainer.max_steps)}: "
                      "nothing to train; raise trainer.max_steps to go on", soft_wrap=True)
    if guard.stopped_at is not None:
        signum = interrupts.signum or int(signal.SIGTERM)  # another rank received it
        raise Interrupted(run_guard.interrupted_message(signum, guard.stopped_at, last, run_guard.resume_command(cfg)),
                          signum)
    unvalidated = validates and trainer.global_step % interval
    if unvalidated or trainer.global_step % save_every:  # the run did not end on a validation/save step
        if unvalidated:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.save_checkpoint(last, weights_only=False)
    if rank_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if task_cfg is None and corpus is None and "val/bpb" in metrics:  # the Trainer API's datasets
            console.print(f"validation: loss {metrics['val/loss']:.4f}, {metrics['val/bpb']:.3f} bits/byte")
        elif corpus is None and "val/loss" in metrics:  # task data: the loss is on the answer tokens
            console.print(f"validation: answer loss {metrics['val/loss']:.4f}; "
                          f"score it with: ltm eval --checkpoint {last} task={cfg.data.name}", soft_wrap=True)
        elif "val/bpb" in metrics:
            baseline = unigram_bpb(corpus)
            console.print(f"validation: loss {metrics['val/loss']:.4f}, {metrics['val/bpb']:.3f} bits/byte "
                          f"(byte-unigram baseline {baseline:.3f} bits/byte)")
        console.print(f"checkpoint: {last}")
        # the prompt is data (a task's may hold brackets or colons): printed as is, no markup or emoji codes
        console.print(generate_command(last, *_prompt_ids(corpus, datamodule)), soft_wrap=True, highlight=False,
                      markup=False, emoji=False)
    return last


def _prompt_ids(corpus: Optional[Corpus], datamodule) -> tuple[list[int], Optional[int]]:
    """The run's own data for the printed `generate` prompt, and the answer's length for task data (else None).

    Text: its validation split, else its first validation (or, without validation, training) sample. Task data
    (`TaskDataModule`): its first validation sample up to where the answer starts, found from the sample's labels
    (`ltm_core.console.task_prompt`), and the answer's length: the printed line asks for just the answer."""
    if corpus is not None:
        return corpus.val, None
    from ltm_core.trainer import as_pair

    if isinstance(datamodule, TaskDataModule):
        from ltm_core.console import task_prompt
        from ltm_core.tasks.common import VALIDATION_STREAM

        # validation sample 0 (made here even with data.val_samples=0); its labels are the answer's alone
        found = task_prompt(*datamodule._samples().sample(0, VALIDATION_STREAM))
        if found is not None:
            return found
    for samples in (datamodule.val_dataloader().dataset, getattr(datamodule, "train", [])):
        if len(samples):
            return as_pair(samples[0])[0].tolist(), None
    return [], None
