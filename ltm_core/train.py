"""`train(cfg)`: what `ltm train` runs. Usable from Python with a config from `ltm_core.configuration.compose`.

Output folder layout:
    OUTPUT_DIR/config.yaml               the resolved config
    OUTPUT_DIR/metrics.csv               train/loss, val/loss, val/bpb ... per logged step
    OUTPUT_DIR/checkpoints/last.ckpt     latest (every trainer.val_check_interval steps and at the end)
    OUTPUT_DIR/checkpoints/best.ckpt     lowest validation loss
    OUTPUT_DIR/.lock                     held while a run trains into the folder (ltm_core.run_guard.RunLock)

Checkpoints are written atomically, also every trainer.checkpoint_every_minutes and on SIGINT/SIGTERM; a kill at any
moment loses at most the steps since the last one (docs/reliability.md).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import sys
import uuid
import warnings
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from rich.console import Console

from ltm_core import run_guard
from ltm_core.config import DataConfig
from ltm_core.console import StepProgressBar, generate_command, quiet_lightning
from ltm_core.configuration import model_config, to_dict, validate
from ltm_core.data import Corpus, TextDataModule, load_corpus, unigram_bpb
from ltm_core.errors import CheckpointError, ConfigError, Interrupted, LtmError, RunStopped
from ltm_core.migration import complete_stored_config
from ltm_core.model import TitanModel
from ltm_core.resources import check_fits_machine, check_threads, cpu_budget, set_threads, worker_threads
from ltm_core.tasks import is_task
from ltm_core.tasks.datamodule import TaskDataModule, task_config
from ltm_core.training import Diverged, TitanLightning, check_resumable

console = Console()
# Lightning notes that do not apply: checkpoints are taken after the optimizer step on purpose (manual
# optimization with one backward per BPTT window), and a torch pytree deprecation inside Lightning itself.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to OUTPUT_DIR/metrics.csv instead of deleting it."""

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


def default_output_dir() -> str:
    """A fresh folder per run; under torchrun/SLURM every rank derives the same name from the job id."""
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if job and job != "none":
        return f"outputs/job-{job}"
    return f"outputs/{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"


def launched_externally() -> bool:
    """True under torchrun / torch elastic / SLURM / mpirun, which start the processes themselves."""
    return any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def world_size(cfg: DictConfig) -> int:
    # --- parallel (ltm_core.parallel): devices × num_nodes, or dp × tp × pp when parallel.devices is null
    from ltm_core.parallel.layout import planned_world_size

    return planned_world_size(cfg)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0


def prepare_output_dir(cfg: DictConfig) -> Path:
    """Check the output folder against resume/overwrite and write config.yaml; returns the folder."""
    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    holds_run = saved.exists() or (out / "checkpoints").exists()
    if holds_run and cfg.resume != "auto" and not cfg.overwrite:
        raise LtmError(f"output error: {out} already holds a run; pass resume=auto to continue it, overwrite=true "
                       "to replace it, or choose another output_dir")
    if holds_run and cfg.resume == "auto" and saved.exists():
        old, new = _saved_model_config(saved), model_config(cfg)
        changed = [k for k, v in vars(new).items() if getattr(old, k) != v]
        if changed:
            k = changed[0]
            raise CheckpointError(f"checkpoint error: {out} was trained with model.{k}={getattr(old, k)}, "
                                  f"not {getattr(new, k)}; resume with the same model config")
    if holds_run and cfg.overwrite and cfg.resume != "auto":
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("metrics.csv", "hparams.yaml"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run_guard.remove_stale_temporaries(out / "checkpoints")  # left by a killed save; the caller holds the lock
    with run_guard.atomic_file(saved) as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True).encode())
    return out


def _saved_model_config(saved: Path):
    """The model config of OUTPUT_DIR/config.yaml, or one line naming what an edit broke."""
    try:
        before = OmegaConf.load(saved)
    except Exception as exc:  # YAML syntax
        raise ConfigError(str(saved), f"is not valid YAML ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(before, DictConfig) or not isinstance(before.get("model"), DictConfig):
        raise ConfigError(str(saved), "has no model section; restore it or choose another output_dir")
    try:  # options added since the run started take the value it was trained with
        return model_config({"model": complete_stored_config(OmegaConf.to_container(before.model, resolve=True))})
    except ConfigError as exc:
        raise ConfigError(f"{saved}: {exc.key}", str(exc).split(": ", 2)[-1]) from None
    except Exception as exc:  # an unresolvable interpolation, a wrong type
        key = getattr(exc, "full_key", None) or "model"
        raise ConfigError(f"{saved}: {key}", " ".join(str(exc).split("\n")[0].split())[:160]) from None


def resume_path(cfg: DictConfig, out: Path) -> Optional[str]:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(cfg.resume).is_file():
        raise CheckpointError(f"checkpoint error: resume={cfg.resume} does not exist")
    return str(cfg.resume)


def train(cfg: DictConfig) -> Path:
    """Train as configured; returns the path of the last checkpoint. Raises LtmError on bad input."""
    validate(cfg)
    cfg = cfg.copy()
    if not cfg.output_dir:
        cfg.output_dir = default_output_dir()
    world = world_size(cfg)
    if not launched_externally():  # refuse what this machine cannot run before writing or starting anything
        check_threads(cfg.trainer.get("threads"))  # a bad trainer.threads fails here, not in a worker
        check_fits_machine(cfg, world, parameter_count(cfg), on_cpu=_on_cpu(cfg))
    # bad data fails before anything is written (task data is generated: nothing to load)
    corpus = None if is_task(cfg.data.name) else load_corpus(DataConfig(**to_dict(cfg.data)))
    local = world > 1 and not launched_externally()
    if local and cfg.parallel.num_nodes > 1:
        raise ConfigError("parallel.num_nodes", "multi-node runs start under torchrun or SLURM (see docs/distributed.md)")
    # one run per folder; other ranks of an external launch wait for rank 0 in the process-group setup
    with run_guard.RunLock(cfg.output_dir) if is_rank_zero() else nullcontext():
        if is_rank_zero():
            prepare_output_dir(cfg)
        if local:
            with worker_threads(cfg.trainer.get("threads"), world):  # the workers share the cores
                _launch_local(cfg, world)
            return Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
        return fit(cfg, corpus)


def parameter_count(cfg: DictConfig) -> int:
    """Parameters of the run's model, counted on the meta device (no memory, no initialisation)."""
    from ltm_core.model import TitanModel

    with torch.device("meta"):
        return TitanModel(model_config(cfg)).num_parameters()


def _on_cpu(cfg: DictConfig) -> bool:
    return cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_local(cfg: DictConfig, nproc: int) -> None:
    """Start `nproc` local worker processes with torch's elastic launcher (the engine behind torchrun). SIGINT /
    SIGTERM reach every worker (the launcher forwards them), which save at the same step and stop; rank 0 prints the
    one line, and this process exits with the workers' code without a line of its own."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its notes on shutting workers down
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ltm-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.5)
    command = os.environ.get(run_guard.RESUME_COMMAND_ENV)
    os.environ[run_guard.RESUME_COMMAND_ENV] = run_guard.resume_command(cfg)  # for the workers' interrupt line
    try:
        config_path = Path(cfg.output_dir) / "config.yaml"
        elastic_launch(config, entrypoint=sys.executable)("-m", "ltm_core.train", str(config_path))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        raise SystemExit(2 if 2 in codes else next((c for c in codes if c > 128), codes[0] or 1)) from None
    except SignalException as exc:  # the workers saved and printed the line (or were killed by the launcher)
        raise SystemExit(128 + int(exc.sigval)) from None
    finally:
        if command is None:
            os.environ.pop(run_guard.RESUME_COMMAND_ENV, None)
        else:
            os.environ[run_guard.RESUME_COMMAND_ENV] = command


def _fit_guarded(cfg: DictConfig, trainer: L.Trainer, module: TitanLightning, datamodule, ckpt_path: Optional[str],
                 guard: run_guard.GuardCallback) -> None:
    """trainer.fit, with the one line of a run that stopped early: which checkpoint holds its work, how to go on."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SIGTERM before training started reached Lightning's handler too; we saved
        if guard.stopped_at is None:
            raise
    except Diverged as err:
        last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
        if guard.saved_step is not None:
            good = f"the last good checkpoint is {last} (step {guard.saved_step})"
        elif ckpt_path:
            good = f"the last good checkpoint is {ckpt_path}, which this run resumed from"
        else:
            good = "no checkpoint was written yet"
        err.args = (f"{err}; {good}: lower optim.lr, then continue with: {run_guard.resume_command(cfg)}",)
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


def fit(cfg: DictConfig, corpus: Optional[Corpus] = None, datamodule: Optional[L.LightningDataModule] = None,
        model: Optional[TitanModel] = None) -> Path:
    """Run Lightning training in this process (one rank of a distributed run, or the only one).

    `datamodule` replaces the one `cfg.data` describes (the Trainer API's datasets; with `has_validation = False`
    there is no validation and no best.ckpt); `model` is trained instead of a new one from `cfg.model`."""
    quiet_lightning()
    threads = set_threads(cfg.trainer.get("threads"), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    # --- parallel (ltm_core.parallel): FSDP2 / tensor / pipeline parallel presets run the native loop
    from ltm_core.parallel.layout import devices_per_node, uses_native

    if uses_native(cfg):
        from ltm_core.parallel import fit_parallel

        return fit_parallel(cfg, corpus)
    # --- end parallel
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
    interrupts = run_guard.Interrupts()
    if cfg.precision.lightning == "16-mixed" and not torch.cuda.is_available():
        raise ConfigError("precision", "fp16-mixed needs a CUDA GPU; use precision=bf16-mixed on CPU")

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
        if ckpt_path:
            console.print(f"resuming from {ckpt_path}")
        elif cfg.resume == "auto":
            console.print(f"resume=auto: no checkpoint in {ckpt_dir}; starting at step 0")

    from lightning.pytorch.callbacks import ModelCheckpoint

    accumulate = int(cfg.trainer.accumulate_grad_batches)
    interval = int(cfg.trainer.val_check_interval)
    save_every = int(cfg.trainer.save_every_n_steps or interval)
    guard = run_guard.GuardCallback(ckpt_dir / "last.ckpt", interrupts, cfg.trainer.checkpoint_every_minutes,
                                    accumulate)
    callbacks = [
        guard,
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=save_every, save_top_k=1,
                        enable_version_counter=False),
    ]
    if validates:
        callbacks.insert(1, ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min",
                                            save_top_k=1, enable_version_counter=False))
    if cfg.trainer.progress:
        callbacks.append(StepProgressBar(console))
    loggers = [ResumableCSVLogger(save_dir=str(out), name="", version="")]
    if cfg.trainer.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    strategy = cfg.parallel.strategy
    if strategy == "ddp" and model.config.use_memory:
        # each window has its own backward: windows after the first do not use the learned initial memory, and
        # with bptt_segments=1 no window uses the memory-write weights (every write is detached)
        strategy = "ddp_find_unused_parameters_true"
    trainer = L.Trainer(
        max_steps=int(cfg.trainer.max_steps), max_epochs=-1, accelerator=cfg.trainer.accelerator,
        devices=devices_per_node(cfg), num_nodes=int(cfg.parallel.num_nodes), strategy=strategy,
        precision=cfg.precision.lightning, val_check_interval=interval * accumulate, check_val_every_n_epoch=None,
        log_every_n_steps=int(cfg.trainer.log_every_n_steps), callbacks=callbacks, logger=loggers,
        enable_progress_bar=bool(cfg.trainer.progress), enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=bool(cfg.trainer.deterministic), use_distributed_sampler=False,
        plugins=[run_guard.AtomicCheckpointIO(lambda ckpt, path: check_resumable(ckpt, module, path))],
        limit_val_batches=None if validates else 0,
    )
    last = ckpt_dir / "last.ckpt"
    if rank_zero and not ckpt_path:  # rows of a run killed before its first checkpoint are logged again
        run_guard.drop_metrics_from(out / "metrics.csv", 0)
    with interrupts:  # from here SIGINT/SIGTERM save at the end of the current step (GuardCallback)
        _fit_guarded(cfg, trainer, module, datamodule, ckpt_path, guard)
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
        console.print(generate_command(last, _prompt_ids(corpus, datamodule)), soft_wrap=True, highlight=False)
    return last


def _prompt_ids(corpus: Optional[Corpus], datamodule) -> list[int]:
    """The run's own data for the printed `generate` prompt: its validation split, else its first validation (or,
    without validation, training) sample."""
    if corpus is not None:
        return corpus.val
    from ltm_core.trainer import as_pair

    for samples in (datamodule.val_dataloader().dataset, getattr(datamodule, "train", [])):
        if len(samples):
            return as_pair(samples[0])[0].tolist()
    return []


if __name__ == "__main__":  # a worker process started by _launch_local: python -m ltm_core.train CONFIG
    try:
        fit(OmegaConf.load(sys.argv[1]))
    except LtmError as err:
        if not isinstance(err, RunStopped) or is_rank_zero():  # every rank stops together: one line, from rank 0
            print(err, file=sys.stderr if not isinstance(err, Interrupted) else sys.stdout, flush=True)
        sys.exit(err.exit_code)
