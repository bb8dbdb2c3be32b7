"""`train(cfg)`: what `ltm train` runs. Usable from Python with a config from `ltm_core.configuration.compose`.

Output folder layout:
    OUTPUT_DIR/config.yaml               the resolved config
    OUTPUT_DIR/metrics.csv               train/loss, val/loss, val/bpb ... per logged step
    OUTPUT_DIR/checkpoints/last.ckpt     latest (every trainer.val_check_interval steps and at the end)
    OUTPUT_DIR/checkpoints/best.ckpt     lowest validation loss
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import sys
import uuid
import warnings
from datetime import datetime
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from rich.console import Console

from ltm_core.config import DataConfig
from ltm_core.console import StepProgressBar, generate_command, quiet_lightning
from ltm_core.configuration import model_config, to_dict, validate
from ltm_core.data import Corpus, TextDataModule, load_corpus, unigram_bpb
from ltm_core.errors import CheckpointError, ConfigError, LtmError
from ltm_core.resources import check_fits_machine, check_threads, cpu_budget, set_threads, worker_threads
from ltm_core.tasks import is_task
from ltm_core.tasks.datamodule import TaskDataModule, task_config
from ltm_core.training import TitanLightning

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


def _is_rank_zero() -> bool:
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
        before = OmegaConf.load(saved)
        old, new = model_config(before), model_config(cfg)
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
    tmp = out / f".config.yaml.{os.getpid()}"
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, saved)
    return out


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
    if world > 1 and not launched_externally():
        if cfg.parallel.num_nodes > 1:
            raise ConfigError("parallel.num_nodes", "multi-node runs start under torchrun or SLURM (see README)")
        out = prepare_output_dir(cfg)
        with worker_threads(cfg.trainer.get("threads"), world):  # the workers share the cores
            _launch_local(out / "config.yaml", world)
        return out / "checkpoints" / "last.ckpt"
    if _is_rank_zero():  # other ranks of an external launch wait for rank 0 in the process-group setup
        prepare_output_dir(cfg)
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


def _launch_local(config_path: Path, nproc: int) -> None:
    """Start `nproc` local worker processes with torch's elastic launcher (the engine behind torchrun)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ltm-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.5)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "ltm_core.train", str(config_path))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        raise SystemExit(2 if 2 in codes else (codes[0] or 1)) from None


def fit(cfg: DictConfig, corpus: Optional[Corpus] = None) -> Path:
    """Run Lightning training in this process (one rank of a distributed run, or the only one)."""
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
    if task_cfg is not None:
        corpus, datamodule = None, TaskDataModule(data_cfg, task_cfg, int(cfg.model.segment_length))
    else:
        corpus = corpus if corpus is not None else load_corpus(data_cfg)
        datamodule = TextDataModule(data_cfg, corpus)
    module = TitanLightning(to_dict(cfg))
    ckpt_path = resume_path(cfg, out)
    if cfg.precision.lightning == "16-mixed" and not torch.cuda.is_available():
        raise ConfigError("precision", "fp16-mixed needs a CUDA GPU; use precision=bf16-mixed on CPU")

    model = module.model
    rank_zero = _is_rank_zero()
    if rank_zero:
        console.print(f"[bold]ltm train[/] -> {out}")
        if corpus is None:  # task data
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

    from lightning.pytorch.callbacks import ModelCheckpoint

    accumulate = int(cfg.trainer.accumulate_grad_batches)
    interval = int(cfg.trainer.val_check_interval)
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                        enable_version_counter=False),
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=interval, save_top_k=1,
                        enable_version_counter=False),
    ]
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
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    last = ckpt_dir / "last.ckpt"
    if trainer.global_step % interval:  # the run did not end on a validation step: validate and save once more
        trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.save_checkpoint(last, weights_only=False)
    if rank_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if corpus is None and "val/loss" in metrics:  # task data: the loss is on the answer tokens
            console.print(f"validation: answer loss {metrics['val/loss']:.4f}; "
                          f"score it with: ltm eval --checkpoint {last} task={cfg.data.name}", soft_wrap=True)
        elif "val/bpb" in metrics:
            baseline = unigram_bpb(corpus)
            console.print(f"validation: loss {metrics['val/loss']:.4f}, {metrics['val/bpb']:.3f} bits/byte "
                          f"(byte-unigram baseline {baseline:.3f} bits/byte)")
        console.print(f"checkpoint: {last}")
        val_ids = corpus.val if corpus is not None else datamodule.val_dataloader().dataset[0][0].tolist()
        console.print(generate_command(last, val_ids), soft_wrap=True, highlight=False)
    return last


if __name__ == "__main__":  # a worker process started by _launch_local: python -m ltm_core.train CONFIG
    try:
        fit(OmegaConf.load(sys.argv[1]))
    except LtmError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
