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
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ltm_core import run_guard
from ltm_core.run_guard import is_rank_zero, launched_externally
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


def world_size(cfg: DictConfig) -> int:
    # --- parallel (ltm_core.parallel): devices × num_nodes, or dp × tp × pp when parallel.devices is null
    from ltm_core.parallel.layout import planned_world_size

    return planned_world_size(cfg)


def holds_run(out: Path) -> bool:
    """Whether a folder holds a run (its config.yaml or checkpoints/): a new run there needs resume or overwrite."""
    return (out / "config.yaml").exists() or (out / "checkpoints").exists()


def prepare_output_dir(cfg: DictConfig) -> "OutputClaim":
    """Check the output folder against resume/overwrite and write config.yaml; returns what it changed there
    (`OutputClaim`: undone if the run does not start). overwrite=true sets the old run aside rather than deleting
    it: it is deleted once the run has started, and put back if it does not."""
    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    occupied = holds_run(out)
    if occupied and cfg.resume != "auto" and not cfg.overwrite:
        raise LtmError(f"output error: {out} already holds a run; pass resume=auto to continue it, overwrite=true "
                       "to replace it, or choose another output_dir")
    if occupied and cfg.resume == "auto" and saved.exists():
        old, new = _saved_model_config(saved), model_config(cfg)
        changed = [k for k, v in vars(new).items() if getattr(old, k) != v]
        if changed:
            k = changed[0]
            raise CheckpointError(f"checkpoint error: {out} was trained with model.{k}={getattr(old, k)}, "
                                  f"not {getattr(new, k)}; resume with the same model config")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(OutputClaim.ASIDE + "*"):  # a run set aside by an overwrite that was killed
        shutil.rmtree(stale, ignore_errors=True)
    claim = OutputClaim(out)
    if occupied and cfg.overwrite and cfg.resume != "auto":
        claim.set_aside(["checkpoints", "metrics.csv", "hparams.yaml", "tensorboard"])
    run_guard.remove_stale_temporaries(out / "checkpoints")  # left by a killed save; the caller holds the lock
    with run_guard.atomic_file(saved) as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True).encode())
    return claim


class OutputClaim:
    """What a run's start changed in its output folder, kept until the run has started (`finish`): the entries
    that were there, config.yaml as it was, and what overwrite=true set aside. A run that stops before writing a
    checkpoint (bad input found late: an unreadable or mismatched resume checkpoint, a device it cannot use) leaves
    the folder as it found it."""

    ASIDE = ".replaced-"  # + a random name: the old run that overwrite=true replaces, until the new one starts

    def __init__(self, out: Path):
        self.out = out
        self.before = {p.name for p in out.iterdir()}
        self.config = (out / "config.yaml").read_bytes() if (out / "config.yaml").is_file() else None
        self.checkpoints = self._checkpoints()
        self.aside: Optional[Path] = None

    def _checkpoints(self) -> dict[str, int]:
        folder = self.out / "checkpoints"
        return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.ckpt")} if folder.is_dir() else {}

    def set_aside(self, names: list[str]) -> None:
        self.aside = self.out / f"{self.ASIDE}{uuid.uuid4().hex[:8]}"
        self.aside.mkdir()
        for name in names:
            if (self.out / name).exists():
                (self.out / name).rename(self.aside / name)
                self.before.discard(name)

    def progressed(self) -> bool:
        """Whether the run wrote a checkpoint (a new one, or one rewritten)."""
        now = self._checkpoints()
        return any(self.checkpoints.get(name) != mtime for name, mtime in now.items())

    def finish(self, started: bool) -> None:
        """started: delete what was set aside; else undo: remove what the run created, restore config.yaml and what
        was set aside."""
        if not started:
            for path in self.out.iterdir():
                if path.name not in self.before and path != self.aside and path.name != ".lock":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            if self.config is None:
                (self.out / "config.yaml").unlink(missing_ok=True)
            else:
                (self.out / "config.yaml").write_bytes(self.config)
            if self.aside is not None:
                for path in self.aside.iterdir():
                    path.rename(self.out / path.name)
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)


def check_output_dir(path: str | Path) -> None:
    """An output folder a run can use: an existing folder it can write into, or one it can create. One line naming
    the problem otherwise."""
    run_guard.writable_folder(Path(path), "output_dir")


def check_devices(cfg: DictConfig) -> None:
    """What the configured devices need, before anything is written: a CUDA GPU for trainer.accelerator=gpu,
    precision=fp16-mixed and model.kernels=triton."""
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", f"{accelerator} needs a CUDA GPU and none is visible; use "
                                                 "trainer.accelerator=auto or cpu")
    if _on_cpu(cfg):
        if cfg.precision.lightning == "16-mixed":
            raise ConfigError("precision", "fp16-mixed needs a CUDA GPU; use precision=bf16-mixed on CPU")
        if cfg.model.get("kernels") == "triton":
            raise ConfigError("model.kernels", "triton needs a CUDA GPU; use model.kernels=auto (the Triton kernels "
                                               "where a GPU runs them) or torch")


def check_resume(cfg: DictConfig) -> None:
    """An explicit resume=PATH exists, and is not inside the output folder that overwrite=true would clear."""
    if cfg.resume in (None, "auto"):
        return
    path = Path(cfg.resume)
    if path.is_dir():  # a run folder, its checkpoints/ folder: which file to give
        from ltm_core.checkpoint import folder_problem

        raise CheckpointError(folder_problem(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint error: resume={cfg.resume} does not exist")
    if cfg.overwrite and Path(cfg.output_dir).resolve() in path.resolve().parents:
        raise ConfigError("resume", f"{cfg.resume} is inside output_dir {cfg.output_dir}, which overwrite=true "
                                    "clears; continue that run with resume=auto, or choose another output_dir")


def check_continues(cfg: DictConfig) -> None:
    """Stage 2 of a two-stage recipe (`continues: NAME`, e.g. experiment=passkey_long continues experiment=passkey)
    starts from a checkpoint: resume=PATH, or resume=auto in a folder that holds one (an interrupted stage 2). One
    line, before anything is written, for a run that would train from scratch, and for a checkpoint trained on
    another task or with another memory than this run's (a baseline's checkpoint for the memory model, or the
    reverse), read from the run config every checkpoint carries. continues=null turns the check off."""
    stage_one = cfg.get("continues")
    if stage_one is None:
        return
    out = Path(cfg.output_dir)
    who = f"{_recipe(cfg) or 'this run'} continues a run of experiment={stage_one}"
    fix = (f"resume=RUN/checkpoints/last.ckpt (made by ltm train experiment={stage_one} output_dir=RUN), or "
           "continues=null to train it from scratch")
    if cfg.resume is None:
        raise ConfigError("resume", f"{who}: add {fix}")
    path = out / "checkpoints" / "last.ckpt" if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.is_file():
        from ltm_core.parallel.checkpoint import latest_dcp

        if (out / "checkpoints" / "dcp").is_dir() and latest_dcp(out) is not None:
            return  # the native parallel loop resumes from its sharded checkpoint
        again = " with overwrite=true" if (out / "config.yaml").exists() else ""  # a stage 2 killed before it saved
        raise ConfigError("resume", f"{who}, and resume=auto finds no checkpoint in {out / 'checkpoints'}: give "
                                    f"{fix.replace(')', ')' + again, 1)}")
    from ltm_core.checkpoint import checkpoint_config, read_checkpoint, stored_model_config

    ckpt = read_checkpoint(path, mmap=True)  # one line for a damaged checkpoint, before anything is written; its
    # tensors mapped, not read (every rank of a parallel run checks)
    trained = (str(checkpoint_config(ckpt)["data"].get("name")),
               model_config({"model": stored_model_config(ckpt, path)}).memory_kind)
    wanted = (str(cfg.data.name), model_config(cfg).memory_kind)
    if trained != wanted:
        given = f"{path} (resume=auto)" if cfg.resume == "auto" else f"resume={cfg.resume}"
        raise CheckpointError(f"checkpoint error: {given} was trained {_describe(*trained)}, but {who} (trained "
                              f"{_describe(*wanted)}): resume from a checkpoint made by ltm train "
                              f"experiment={stage_one}, or add continues=null to resume from this one anyway")


def _recipe(cfg: DictConfig) -> Optional[str]:
    """`experiment=NAME` as this run was given it on the command line (`ltm train`), else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None  # no Hydra run (Python callers)
    hydra_cfg = HydraConfig.get()
    if Path(hydra_cfg.runtime.output_dir).resolve() != Path(cfg.output_dir).resolve():
        return None  # left over from an earlier run in this process
    name = hydra_cfg.runtime.choices.get("experiment")
    return f"experiment={name}" if name else None


def _describe(data: str, memory: Optional[str]) -> str:
    """What a run trained on, e.g. `on passkey with the tokens memory`."""
    return f"on {data} " + (f"with the {memory} memory" if memory else "without memory")


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
        raise ConfigError(f"{saved}: {exc.key}", exc.detail) from None
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
    """Train as configured; returns the path of the last checkpoint. Raises LtmError on bad input, and then leaves
    the output folder as it was (`run_in_output_dir`)."""
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

    def start() -> Path:
        if local:
            with worker_threads(cfg.trainer.get("threads"), world):  # the workers share the cores
                _launch_local(cfg, world)
            return Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
        return fit(cfg, corpus)

    return run_in_output_dir(cfg, start)


def run_in_output_dir(cfg: DictConfig, start: Callable[[], Path]) -> Path:
    """Run `start()` (the training; returns the last checkpoint) in cfg.output_dir: the devices, the resume
    checkpoint and the folder checked first, the folder locked (`RunLock`) and prepared (`prepare_output_dir`), and
    left as it was found if the run stops before it writes a checkpoint (an error found late: `OutputClaim`). Only
    rank 0 touches the folder; the other ranks of an external launch wait for it in the process-group setup. A stage-2
    recipe (`continues`) is refused before anything is written when it has no checkpoint of its stage 1 to start from
    (`check_continues`)."""
    check_devices(cfg)
    check_resume(cfg)
    check_continues(cfg)  # a stage-2 recipe starts from its stage 1's checkpoint
    rank_zero = is_rank_zero()
    if rank_zero:
        check_output_dir(cfg.output_dir)
    out = Path(cfg.output_dir)
    existed = out.exists()
    try:
        with run_guard.RunLock(out) if rank_zero else nullcontext():
            claim = prepare_output_dir(cfg) if rank_zero else None
            try:
                last = start()
            except BaseException as exc:
                if claim is not None:
                    claim.finish(started=isinstance(exc, RunStopped) or claim.progressed())
                raise
            if claim is not None:
                claim.finish(started=True)
            return last
    finally:
        if rank_zero and not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made for a run that did not start


def parameter_count(cfg: DictConfig) -> int:
    """Parameters of the run's model, counted on the meta device (no memory, no initialisation; tied as
    initialisation would tie them)."""
    from ltm_core.model import TitanModel

    with torch.device("meta"):
        model = TitanModel(model_config(cfg))
        model.tie_weights()
        return model.num_parameters()


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

    # its notes on shutting workers down, and its line on a failed worker (which has printed its own)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
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
        # every rank stops together, and the ranks `ltm train` starts on this machine check the same input: one line,
        # from rank 0 (under torchrun or SLURM a rank's own input, e.g. its node's data, may differ: each says)
        together = isinstance(err, RunStopped) or run_guard.RESUME_COMMAND_ENV in os.environ
        if is_rank_zero() or not together:
            print(err, file=sys.stderr if not isinstance(err, Interrupted) else sys.stdout, flush=True)
        sys.exit(err.exit_code)
