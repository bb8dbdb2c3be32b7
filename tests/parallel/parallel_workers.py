"""Process-group runners for the parallel tests (importable by forkserver children)."""

from __future__ import annotations

import csv
import gc
import os
import socket
from pathlib import Path
from typing import Any

# Tiny model and data: every preset under test can split it (4 heads -> tp2, 2 layers -> pp2).
# The default memory (tokens: its importance is a parameter outside the TP plan, replicated, whose read bias every
# head reads: its gradient sums over tp), without its write noise, whose draws follow the process layout (each dp
# rank draws for its own samples); the short convolution carried across segments (pipeline stages carry it).
BASE = ["data=textfile", "data.seq_len=128", "data.batch_size=4", "data.val_samples=8",
        "model.hidden_size=32", "model.num_attention_heads=4", "model.num_hidden_layers=2", "model.memory.slots=8",
        "model.segment_length=32", "model.bptt_segments=2", "model.kernels=torch",
        "model.short_conv=3", "trainer=debug", "trainer.accelerator=cpu", "trainer.progress=false",
        "optim.schedule_steps=5", "optim.warmup_steps=2", "overwrite=true"]
NO_NOISE = ["model.memory.select_noise=0"]  # (a key of the tokens memory only)


def read_losses(out: Path) -> list[float]:
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def read_weights(out: Path) -> dict:
    import torch

    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_group(rank: int, world: int, port: int) -> None:
    """This process becomes rank `rank` of a `world`-process gloo group on localhost, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def run_jobs(rank: int, world: int, port: int, jobs: list[dict[str, Any]]) -> None:
    """One rank: join a gloo group, then run each resolved config through `fit_parallel` in turn."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    join_gloo_group(rank, world, port)
    try:
        from ltm_core.parallel.trainer import fit_parallel
        from ltm_core.train import prepare_output_dir

        for job in jobs:
            cfg = OmegaConf.create(job)
            if rank == 0:
                prepare_output_dir(cfg)
            dist.barrier()
            fit_parallel(cfg)
    finally:
        leave_gloo_group()


def leave_gloo_group() -> None:
    """Leave the gloo group: gloo's teardown is flaky with live tensors and without a barrier (a rank aborted with
    "terminate called without an active exception" in about 1 run of 10 of the tp noise test before it used this)."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def spawn_jobs(world: int, jobs: list[dict[str, Any]]) -> None:
    """Run `jobs` on `world` processes forked from a forkserver that has imported the training stack once."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["torch", "lightning", "ltm_core.parallel.trainer", __name__])
    mp.start_processes(run_jobs, args=(world, free_port(), jobs), nprocs=world, start_method="forkserver")


def tp_memory_banks_agree(rank: int, world: int, port: int, model_cfg: dict, steps: int) -> None:
    """One tp rank: `steps` training steps of a tp=`world` model on the same random batch, then every layer's
    replicated memory bank and every replicated parameter must be bitwise the same on all tp ranks (the select
    write's Gumbel noise is drawn on each rank: the ranks must draw the same). Raises on a mismatch."""
    from ltm_core.config import TitanConfig

    join_gloo_group(rank, world, port)
    try:
        _tp_memory_banks_agree(world, TitanConfig.from_dict(model_cfg), steps)
    finally:
        leave_gloo_group()


def _tp_memory_banks_agree(world: int, cfg, steps: int) -> None:
    """The body of `tp_memory_banks_agree`, in a frame of its own: its tensors are gone before the group is left."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ltm_core.parallel.build import build_parallel_model
    from ltm_core.parallel.layout import Layout

    pm = build_parallel_model(cfg, Layout(dp=1, tp=world, pp=1), torch.device("cpu"), "32-true", 0, 2)
    model = pm.parts[0].train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 256, (2, 3 * cfg.segment_length + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    mine = [t.detach() for t in out.memory.tensors()]
    mine += [p.detach() for p in model.parameters() if not isinstance(p, DTensor)]
    for t in mine:
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t.contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), "tp ranks diverged"
