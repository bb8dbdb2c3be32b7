"""Rank and world size from the launcher's environment, the device, and the process group.

Launchers understood: torchrun / torch elastic (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), SLURM
`srun` without torchrun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR must be exported by the batch
script), Open MPI `mpirun` (OMPI_COMM_WORLD_*) and MPICH/Intel MPI (PMI_RANK, PMI_SIZE). `ltm train` itself starts
local processes with torch's elastic launcher, which sets the torchrun variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ltm_core.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    created_group: bool  # this call initialised the default process group (and must destroy it)


def launcher_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment; (0, 1, 0) when nothing launched us."""
    env = os.environ
    launchers = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun / torch elastic
                 ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun
                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
                 ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"))  # MPICH / Intel MPI
    for rank_key, world_key, local_key in launchers:
        if rank_key in env and world_key in env:
            return int(env[rank_key]), int(env[world_key]), int(env.get(local_key, 0))
    return 0, 1, 0


def select_device(accelerator: str, local_rank: int) -> torch.device:
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", "gpu was requested but no CUDA device is visible")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(accelerator: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Join (or create) the default process group: gloo on CPU, NCCL on CUDA."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", launcher_env()[2]))
        device = select_device(accelerator, local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistEnv(rank, world, local, device, dist.get_backend(), False)
    rank, world, local = launcher_env()
    device = select_device(accelerator, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank), str(world), str(local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local, device, backend, True)


def shutdown(env: DistEnv) -> None:
    """Tear down a process group this process created, once every rank got here."""
    if env.created_group:
        end_group(clean=True)


def end_group(clean: bool) -> None:
    """Destroy this process's default group, if any. `clean` (every rank finished): gc and a barrier first. Left to
    the interpreter's exit, gloo's teardown sometimes aborts the process ("terminate called without an active
    exception") after a run that succeeded."""
    import gc

    if not dist.is_initialized():
        return
    if not clean:
        dist.destroy_process_group()
        return
    gc.collect()
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
