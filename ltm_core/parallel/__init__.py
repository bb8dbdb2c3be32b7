"""Distributed training on torch.distributed: FSDP2, tensor and pipeline parallelism on one DeviceMesh.

    layout.py           dp × tp × pp, world size, config checks (no torch.distributed import)
    env.py              rank / world size from torchrun, SLURM or mpirun; process-group setup
    tensor_parallel.py  the parallelize plan of a Block (ColwiseParallel / RowwiseParallel)
    pipeline.py         stage modules (blocks split by name) and the pipeline schedules
    build.py            meta construction, TP, weights, FSDP2 `fully_shard`, mixed precision
    grads.py            global gradient norm / clipping, tied-embedding gradients, fp16 loss scaling
    checkpoint.py       distributed checkpoint save / resume and consolidation into last.ckpt
    trainer.py          `fit_parallel(cfg, corpus)`: the training loop
    bench.py            `bench_parallel(presets)`: communication volume per step, measured and analytic

Import the heavy parts lazily: `from ltm_core.parallel.trainer import fit_parallel`.
"""

from ltm_core.parallel.layout import Layout, planned_world_size, resolve_layout, uses_native, validate_parallel


def fit_parallel(cfg, corpus=None):
    """See `ltm_core.parallel.trainer.fit_parallel`."""
    from ltm_core.parallel.trainer import fit_parallel as _fit

    return _fit(cfg, corpus)


__all__ = ["Layout", "fit_parallel", "planned_world_size", "resolve_layout", "uses_native", "validate_parallel"]
