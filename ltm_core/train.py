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

import os
import shutil
import socket
import sys
import uuid
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ltm_core import run_guard
from ltm_core.config import DataConfig
from ltm_core.configuration import model_config, to_dict, validate
from ltm_core.data import Corpus, load_corpus
from ltm_core.errors import CheckpointError, ConfigError, Interrupted, LtmError, RunStopped
from ltm_core.migration import complete_stored_config
from ltm_core.model import TitanModel
from ltm_core.resources import check_fits_machine, check_threads, keep_freed_memory, set_threads, worker_threads
from ltm_core.tasks import is_task

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


def fit(cfg: DictConfig, corpus: Optional[Corpus] = None, datamodule=None, model: Optional[TitanModel] = None) -> Path:
    """Train in this process (one rank of a distributed run, or the only one): the native loop for the FSDP2 /
    tensor / pipeline parallel presets, Lightning otherwise (`ltm_core.lit`, imported only then).

    `datamodule` (a LightningDataModule) replaces the one `cfg.data` describes (the Trainer API's datasets; with
    `has_validation = False` there is no validation and no best.ckpt); `model` is trained instead of a new one from
    `cfg.model`. Sets this process's torch threads and, on CPU, lets malloc keep freed memory for the next step
    (`ltm_core.resources.keep_freed_memory`)."""
    threads = set_threads(cfg.trainer.get("threads"), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if _on_cpu(cfg):
        keep_freed_memory()
    from ltm_core.parallel.layout import uses_native

    if uses_native(cfg):
        from ltm_core.parallel import fit_parallel

        return fit_parallel(cfg, corpus)
    from ltm_core.lit import fit_lightning
    from ltm_core.parallel.env import end_group

    owns_group = not torch.distributed.is_initialized()  # Lightning's DDP creates one and leaves it to the exit
    ok = False
    try:
        last = fit_lightning(cfg, threads, corpus, datamodule, model)
        ok = True
        return last
    finally:
        if owns_group:
            end_group(clean=ok)


if __name__ == "__main__":  # a worker process started by _launch_local: python -m ltm_core.train CONFIG
    try:
        fit(OmegaConf.load(sys.argv[1]))
    except LtmError as err:
        if not isinstance(err, RunStopped) or is_rank_zero():  # every rank stops together: one line, from rank 0
            print(err, file=sys.stderr if not isinstance(err, Interrupted) else sys.stdout, flush=True)
        sys.exit(err.exit_code)
