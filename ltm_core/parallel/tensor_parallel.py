"""Tensor parallelism of a Block with torch.distributed.tensor.parallel (Megatron-style column/row splits).

Plan of one block over the tp mesh (each rank keeps H / tp attention heads and F / tp SwiGLU channels):

    attn.qkv_proj          column-wise by heads   (fused q|k|v: each rank keeps q, k and v of its heads; the tokens
                                                   memory's kept tokens go through it too)
    attn.o_proj            row-wise               (all-reduce of the output)
    ffn.gate_up_proj       column-wise            (fused gate|up: each rank keeps both halves of its channels)
    ffn.down_proj          row-wise

plus the memory kind's own entries (MEMORY_PLANS):

    slots   memory.reader.q_proj   column-wise by heads; memory.reader.kv_proj fused k|v column-wise by heads (the
            slot keys/values follow the heads); memory.reader.o_proj row-wise; memory.{query,key,value,update}
            column-wise with gathered output (the one-head write attention over M slots then runs on every rank, so
            the memory [B, M, D] stays replicated and identical on the tp ranks)
    tokens  nothing: its importance weights are replicated; the read bias log sigmoid(importance) is read by every
            head, so its gradient is summed over the tp group (`TokensMemory.shared_by_heads`)
    delta   nothing: the map, its write and its read stay replicated
    neural  nothing: the MLP's weights, its write and its read stay replicated (MAC's retrieved and persistent
            tokens go through attn.qkv_proj, whose input gradient is summed over the tp group)

Embeddings, norms, the short convolution and the LM head stay replicated (the vocabulary is 259 bytes). Every name
in the plan must exist in the block: a plan naming a missing module is an error, not a silent skip.
The fused projections keep their parameter names; their weight is held as a [chunks, out / chunks, in] DTensor
sharded on dim 1, which is the canonical [out, in] matrix viewed 3-D (consolidation reshapes it back).
"""

from __future__ import annotations

import functools
import types

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel,
                                               parallelize_module)


class _ReduceGrad(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over the tp group in backward (Megatron's `f`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _reduce_grad(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceGrad.apply(x, group)


def _fused_colwise_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _fused_colwise_chunks(self, x, 0)


def _fused_colwise_chunks(self: nn.Linear, x: torch.Tensor, first: int) -> torch.Tensor:
    """The local columns of the chunks from `first` on (`ltm_core.layers.project_chunks`; 0: the whole projection),
    x's gradient all-reduced (none where it has none)."""
    weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight  # [chunks, out/tp/chunks, in]
    weight = weight.reshape(self._tp_chunks, -1, weight.shape[-1])[first:].reshape(-1, weight.shape[-1])
    return F.linear(_reduce_grad(x, self._tp_group), weight)


class FusedColwiseParallel(ParallelStyle):
    """Column-parallel nn.Linear whose output is `chunks` projections side by side (q|k|v, gate|up, k|v).

    Rank r computes, for every chunk, the r-th slice of its columns, so the local output is
    [chunk_0 slice r, chunk_1 slice r, ...] and the module code splits it exactly as on one device.
    """

    def __init__(self, chunks: int):
        super().__init__()
        self.chunks = chunks

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear) or module.bias is not None:
            raise TypeError("FusedColwiseParallel needs an nn.Linear without bias")
        weight = module.weight
        out, inp = weight.shape
        view = weight.detach().view(self.chunks, out // self.chunks, inp)
        module.weight = nn.Parameter(distribute_tensor(view, device_mesh, [Shard(1)], src_data_rank=None),
                                     requires_grad=weight.requires_grad)
        module._tp_group = device_mesh.get_group()
        module._tp_chunks = self.chunks
        module.forward = types.MethodType(_fused_colwise_forward, module)
        module.project_chunks = types.MethodType(_fused_colwise_chunks, module)
        return module


BACKBONE_PLAN = {"attn.qkv_proj": lambda: FusedColwiseParallel(3), "attn.o_proj": RowwiseParallel,
                 "ffn.gate_up_proj": lambda: FusedColwiseParallel(2), "ffn.down_proj": RowwiseParallel}
MEMORY_PLANS = {
    "tokens": {},
    "slots": {"memory.reader.q_proj": ColwiseParallel, "memory.reader.kv_proj": lambda: FusedColwiseParallel(2),
              "memory.reader.o_proj": RowwiseParallel,
              **{f"memory.{n}": lambda: ColwiseParallel(output_layouts=Replicate())
                 for n in ("query", "key", "value", "update")}},
    "delta": {},
    "neural": {},
}
HEADED = {"tokens": (), "slots": ("memory.reader",), "delta": (),  # modules whose `heads` the split divides
          "neural": ()}


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    """The parallelize plan of one Block; every module it names must exist (else a plan and the model disagree)."""
    names = dict(BACKBONE_PLAN)
    if block.memory is not None:
        names.update(MEMORY_PLANS[block.memory.kind])
    plan = {}
    for name, style in names.items():
        try:
            sub = block.get_submodule(name)
        except AttributeError:
            raise RuntimeError(f"tensor-parallel plan: the block has no module {name!r}") from None
        if not isinstance(sub, nn.Linear):
            raise RuntimeError(f"tensor-parallel plan: {name!r} is a {type(sub).__name__}, not an nn.Linear")
        plan[name] = style()
    return plan


def apply_tensor_parallel(blocks, tp_mesh: DeviceMesh) -> None:
    """Parallelize every block in place; each attention / memory-read module then works on its local heads."""
    tp = tp_mesh.size()
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan(block))
        block.attn.heads = block.attn.heads // tp
        if block.memory is not None:
            block.memory.shared_by_heads = functools.partial(_reduce_grad, group=tp_mesh.get_group())
            for name in HEADED[block.memory.kind]:
                module = block.get_submodule(name)
                module.heads = module.heads // tp


def canonical_shape(param: torch.Tensor) -> torch.Size:
    """The single-device shape of a (possibly TP-reshaped) parameter."""
    shape = param.shape
    return torch.Size([shape[0] * shape[1], *shape[2:]]) if len(shape) == 3 else shape
