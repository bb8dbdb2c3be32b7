"""The process layout of a run: dp × tp × pp, the world size, and the checks made before any process starts.

Nothing here imports torch.distributed, so `ltm_core.configuration.validate` can call `validate_parallel` cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ltm_core.config import TASK_NAMES
from ltm_core.errors import ConfigError

STRATEGIES = ("auto", "ddp", "native")
SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    schedule: str = "1f1b"
    microbatches: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.schedule == "interleaved" and self.pp > 1 else 1

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def describe(self) -> str:
        text = f"dp={self.dp} × tp={self.tp} × pp={self.pp}"
        if self.pp > 1:
            text += f" ({self.schedule}, {self.microbatches} microbatches, {self.num_stages} stages)"
        return text


def _get(cfg: Any, key: str, default: Any) -> Any:
    parallel = cfg["parallel"] if not hasattr(cfg, "parallel") else cfg.parallel
    try:
        value = parallel[key] if isinstance(parallel, dict) else getattr(parallel, key)
    except (KeyError, AttributeError):
        return default
    return default if value is None and default is not None else value


def uses_native(cfg: Any) -> bool:
    """True when the run goes through `ltm_core.parallel.fit_parallel` instead of Lightning."""
    return _get(cfg, "strategy", "auto") == "native" or int(_get(cfg, "tp", 1)) > 1 or int(_get(cfg, "pp", 1)) > 1


def _gpus(cfg: Any) -> int:
    accelerator = cfg["trainer"]["accelerator"] if isinstance(cfg, dict) else cfg.trainer.accelerator
    if accelerator == "cpu":
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is always there in practice
        return 0


def devices_per_node(cfg: Any) -> int:
    """Processes to start on each node (the `devices` key, or derived from the layout)."""
    devices: Optional[int] = _get(cfg, "devices", None)
    if devices is not None:
        return int(devices)
    nodes = int(_get(cfg, "num_nodes", 1))
    dp, tp, pp = int(_get(cfg, "dp", -1)), int(_get(cfg, "tp", 1)), int(_get(cfg, "pp", 1))
    if dp > 0:
        return max(1, dp * tp * pp // nodes)
    return _gpus(cfg) or tp * pp  # dp=-1: fill the GPUs of the machine; on CPU dp=1


def planned_world_size(cfg: Any) -> int:
    return devices_per_node(cfg) * int(_get(cfg, "num_nodes", 1))


def resolve_layout(cfg: Any, world: Optional[int] = None) -> Layout:
    """dp × tp × pp for `world` processes (default: the planned world size); dp=-1 takes the rest."""
    world = planned_world_size(cfg) if world is None else world
    dp, tp, pp = int(_get(cfg, "dp", -1)), int(_get(cfg, "tp", 1)), int(_get(cfg, "pp", 1))
    if dp == -1:
        if world % (tp * pp):
            raise ConfigError("parallel.tp", f"tp × pp = {tp} × {pp} = {tp * pp} does not divide the world size "
                              f"{world}")
        dp = world // (tp * pp)
    if dp * tp * pp != world:
        raise ConfigError("parallel.dp", f"dp × tp × pp = {dp} × {tp} × {pp} = {dp * tp * pp} must equal the world "
                          f"size {world}; set parallel.dp=-1 to use the rest")
    return Layout(dp, tp, pp, str(_get(cfg, "schedule", "1f1b")), int(_get(cfg, "microbatches", 1)))


def external_world_size() -> Optional[int]:
    """The world size set by torchrun / SLURM / mpirun, or None."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return None


def validate_parallel(cfg: Any, model: Any, data: Any) -> None:
    """One ConfigError line for a layout that cannot run (called by `ltm_core.configuration.validate`).

    `model` is the TitanConfig, `data` the DataConfig of the run.
    """
    strategy = _get(cfg, "strategy", "auto")
    if strategy not in STRATEGIES:
        raise ConfigError("parallel.strategy", f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    devices, nodes = _get(cfg, "devices", None), int(_get(cfg, "num_nodes", 1))
    dp, tp, pp = int(_get(cfg, "dp", -1)), int(_get(cfg, "tp", 1)), int(_get(cfg, "pp", 1))
    schedule, microbatches = _get(cfg, "schedule", "1f1b"), int(_get(cfg, "microbatches", 1))
    if devices is not None and int(devices) <= 0 or nodes <= 0:
        raise ConfigError("parallel.devices", "parallel.devices and parallel.num_nodes must be positive")
    for key, value in (("tp", tp), ("pp", pp), ("microbatches", microbatches)):
        if value <= 0:
            raise ConfigError(f"parallel.{key}", f"must be a positive integer, got {value}")
    if dp == 0 or dp < -1:
        raise ConfigError("parallel.dp", f"must be a positive integer or -1 (the rest), got {dp}")
    if schedule not in SCHEDULES:
        raise ConfigError("parallel.schedule", f"must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if devices is not None:
        world = int(devices) * nodes
        if dp == -1 and world % (tp * pp):
            raise ConfigError("parallel.tp", f"tp × pp = {tp} × {pp} does not divide the world size {world} "
                              f"(parallel.devices={devices} × parallel.num_nodes={nodes})")
        if dp > 0 and dp * tp * pp != world:
            raise ConfigError("parallel.dp", f"dp × tp × pp = {dp} × {tp} × {pp} = {dp * tp * pp} must equal the "
                              f"world size {world} (parallel.devices={devices} × parallel.num_nodes={nodes}); "
                              "set parallel.dp=-1 to use the rest")
    elif dp > 0 and (dp * tp * pp) % nodes:
        raise ConfigError("parallel.num_nodes", f"dp × tp × pp = {dp * tp * pp} processes do not split evenly over "
                          f"{nodes} nodes")
    if (strategy == "native" or tp > 1 or pp > 1) and data.name in TASK_NAMES:
        raise ConfigError("data.name", f"data={data.name} (a generated task) is not supported with strategy=native "
                                       "presets yet; train it with parallel=single or parallel=ddp")
    if tp > 1:
        ffn = "model.intermediate_size" if model.intermediate_size is not None else "the FFN width (8/3 × "\
            "model.hidden_size rounded up to 64; model.intermediate_size sets it)"
        checks = [("model.num_attention_heads", model.num_attention_heads), (ffn, model.ffn_dim)]
        if model.memory_kind == "slots":  # its read's heads and the write projections are split
            checks += [("model.memory.heads", model.memory.heads or model.num_attention_heads),
                       ("model.memory.dim", model.memory.dim)]
        for key, value in checks:
            if value % tp:
                raise ConfigError("parallel.tp", f"{key}={value} is not divisible by parallel.tp={tp}")
    if pp > 1:
        layout = Layout(max(dp, 1), tp, pp, schedule, microbatches)
        stages = layout.num_stages
        if model.num_hidden_layers < stages:
            extra = " (2 per pp rank with schedule=interleaved)" if layout.stages_per_rank > 1 else ""
            raise ConfigError("parallel.pp", f"model.num_hidden_layers={model.num_hidden_layers} is fewer than the "
                              f"{stages} pipeline stages{extra}")
        if data.batch_size % microbatches:
            raise ConfigError("parallel.microbatches", f"{microbatches} does not divide data.batch_size="
                              f"{data.batch_size}")
        if schedule == "1f1b" and microbatches < stages:
            raise ConfigError("parallel.microbatches", f"schedule=1f1b needs at least as many microbatches as "
                              f"stages ({stages}), got {microbatches}")
        rounds = max(1, microbatches // pp)
        if schedule == "interleaved" and microbatches % rounds:
            raise ConfigError("parallel.microbatches", f"schedule=interleaved needs microbatches divisible by "
                              f"{rounds} (microbatches // pp), got {microbatches}")
        span = model.segment_length * model.bptt_segments
        if data.seq_len % span:
            raise ConfigError("data.seq_len", f"{data.seq_len} must be a multiple of model.segment_length × "
                              f"model.bptt_segments = {span} with pipeline parallelism (fixed window shapes)")
