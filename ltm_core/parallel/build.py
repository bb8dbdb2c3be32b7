"""Build the model of one rank on the 3-D DeviceMesh (dp, pp, tp): meta construction, pipeline split, tensor
parallelism, materialisation, weights, FSDP2 `fully_shard` over dp and the precision policy.

Weights: every rank initialises the full model on the CPU from `cfg.seed` exactly as the single-process run does
(`seed_everything` + `TitanModel(cfg)`), and copies out its shard, so a parallel run starts from the very same
weights as a single-process one (and can be compared with it step by step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

from ltm_core.config import TitanConfig
from ltm_core.errors import ConfigError
from ltm_core.model import TitanModel
from ltm_core.parallel.layout import Layout
from ltm_core.parallel.pipeline import StageModel, build_schedule, pipeline_loss, split_layers, stage_ids
from ltm_core.parallel.tensor_parallel import apply_tensor_parallel

PRECISIONS = {  # Lightning precision string -> compute dtype (mixed: fp32 weights, FSDP2 MixedPrecisionPolicy)
    "32-true": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "bf16-true": torch.bfloat16,  # the weights themselves in bf16
}


@dataclass
class ParallelModel:
    """What one rank holds."""

    layout: Layout
    mesh: DeviceMesh
    device: torch.device
    parts: list[nn.Module]  # the TitanModel (pp=1) or this rank's StageModels
    precision: str
    stages: list = field(default_factory=list)  # PipelineStages (pp > 1)
    schedule: Any = None
    loss_ctx: dict = field(default_factory=dict)  # read by the pipeline loss function
    tie_group: Optional[dist.ProcessGroup] = None  # first & last pipeline stage of this (dp, tp) coordinate
    fsdp: bool = False

    @property
    def config(self) -> TitanConfig:
        return self.parts[0].config

    @property
    def has_first(self) -> bool:
        return self.layout.pp == 1 or any(p.is_first for p in self.parts)

    @property
    def has_last(self) -> bool:
        return self.layout.pp == 1 or any(p.is_last for p in self.parts)

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    def coordinate(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    def named_parameters(self):
        """(name, parameter, counted) over the parts; `counted` is False for the last stage's copy of a tied
        embedding (it is the same weight as the first stage's, and must enter the gradient norm once)."""
        for part in self.parts:
            seen = set()
            for name, p in part.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                copy = (self.layout.pp > 1 and name == "lm_head.weight" and self.config.tie_word_embeddings)
                yield name, p, not copy


def reference_state(model_cfg: TitanConfig, seed: int) -> dict[str, torch.Tensor]:
    """The single-process initial weights: the random states Lightning's `seed_everything(seed)` sets (Python's,
    NumPy's and torch's; not imported here: the native-parallel ranks run without Lightning), then `TitanModel(cfg)`."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = TitanModel(model_cfg)
    return model.state_dict()


@torch.no_grad()
def load_full_state(part: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of full (single-device) tensors into `part` (DTensor parameters included)."""
    for name, p in part.named_parameters():
        full = state[name]
        if isinstance(p, DTensor):
            full = full.to(device=p.device, dtype=p.dtype).reshape(p.shape)
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(full.reshape(p.shape))
    for name, b in part.named_buffers():
        if name in state:
            b.copy_(state[name])


def apply_fsdp(part: nn.Module, dp_mesh: DeviceMesh, precision: str) -> None:
    """FSDP2 over the dp mesh, one unit per model part (the model, or a pipeline stage).

    Why not one unit per block: a block runs once per segment, several times per backprop window, and FSDP2
    all-gathers a unit at every call after a reshard and reduce-scatters after every backward call. One unit per
    part gathers the parameters once per window (kept through its backward) and reduce-scatters the gradients
    once per optimizer step (once per window with pipeline parallelism); optimizer state, gradients and
    parameters between steps stay sharded. Parameters whose first dimension does not split evenly over dp
    (the fused [chunks, out, in] TP weights) are sharded on another dimension."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    dtype = PRECISIONS[precision]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if precision.endswith("mixed") \
        else MixedPrecisionPolicy()
    n = dp_mesh.size()

    def placement(p: nn.Parameter):
        taken = {pl.dim for pl in getattr(p, "placements", ()) if pl.is_shard()}
        for dim, size in enumerate(p.shape):
            if size % n == 0 and dim not in taken:
                return Shard(dim)
        return Shard(0)

    fully_shard(part, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False, shard_placement_fn=placement)


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    return init_device_mesh(device.type, (layout.dp, layout.pp, layout.tp), mesh_dim_names=("dp", "pp", "tp"))


def build_parallel_model(model_cfg: TitanConfig, layout: Layout, device: torch.device, precision: str, seed: int,
                         batch_size: int, mesh: Optional[DeviceMesh] = None) -> ParallelModel:
    """This rank's share of the model for `layout` (the mesh is built unless given)."""
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"unknown precision {precision!r}")
    if precision == "16-mixed" and device.type != "cuda":
        raise ConfigError("precision", "fp16-mixed needs a CUDA GPU; use precision=bf16-mixed on CPU")
    mesh = mesh if mesh is not None else build_mesh(layout, device)
    state = reference_state(model_cfg, seed)
    with torch.device("meta"):
        meta = TitanModel(model_cfg)
    if layout.pp == 1:
        parts: list[nn.Module] = [meta]
    else:
        bounds = split_layers(model_cfg.num_hidden_layers, layout.num_stages)
        ids = stage_ids(mesh.get_local_rank("pp"), layout.pp, layout.stages_per_rank)
        parts = [StageModel(meta, bounds[s], s == 0, s == layout.num_stages - 1) for s in ids]
    for part in parts:
        if layout.tp > 1:
            apply_tensor_parallel(part.blocks, mesh["tp"])
        part.to_empty(device=device)
        part.tie_weights()
        load_full_state(part, state)
        if precision == "bf16-true":
            part.to(torch.bfloat16)
    del state
    fsdp = layout.dp > 1 or precision.endswith("mixed")
    if fsdp:
        for part in parts:
            apply_fsdp(part, mesh["dp"], precision)
    pm = ParallelModel(layout, mesh, device, parts, precision, fsdp=fsdp)
    if layout.pp > 1:
        _build_pipeline(pm, model_cfg, batch_size)
    return pm


def _build_pipeline(pm: ParallelModel, model_cfg: TitanConfig, batch_size: int) -> None:
    from torch.distributed.pipelining import PipelineStage

    layout, device = pm.layout, pm.device
    dtype = PRECISIONS[pm.precision]
    mb = batch_size // layout.microbatches
    span = model_cfg.segment_length * model_cfg.bptt_segments
    # activations carry gradients (static metadata: no shape inference run through the stateful stages)
    hidden = torch.empty(mb, span, model_cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    ids = stage_ids(pm.coordinate("pp"), layout.pp, layout.stages_per_rank)
    for sid, part in zip(ids, pm.parts):
        part.microbatches = layout.microbatches
        inputs = torch.empty(mb, span, dtype=torch.long, device="meta") if part.is_first else hidden
        logits = torch.empty(mb, span, model_cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
        outputs = logits if part.is_last else hidden
        pm.stages.append(PipelineStage(part, sid, layout.num_stages, device, input_args=inputs,
                                       output_args=outputs, group=pm.group("pp")))
    pm.schedule = build_schedule(pm.stages, layout.schedule, layout.microbatches, pipeline_loss(pm.loss_ctx))
    if model_cfg.tie_word_embeddings:  # the embedding lives on the first stage and the LM head on the last
        grid = pm.mesh.mesh  # [dp, pp, tp] global ranks
        me = dist.get_rank()
        for d in range(layout.dp):
            for t in range(layout.tp):
                ranks = [int(grid[d, 0, t]), int(grid[d, layout.pp - 1, t])]
                group = dist.new_group(ranks)
                if me in ranks:
                    pm.tie_group = group
