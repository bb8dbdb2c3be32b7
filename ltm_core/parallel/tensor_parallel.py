"""Tensor parallelism of a Block with torch.distributed.tensor.parallel (Megatron-style column/row splits).

Plan of one block over the tp mesh (each rank keeps H / tp attention heads and F / tp SwiGLU channels):

    attn.qkv_proj          column-wise by heads   (fused q|k|v: each rank keeps q, k and v of its heads)
    attn.o_proj            row-wise               (all-reduce of the output)
    memory_read.q_proj     column-wise by heads   (memory_read=cross)
    memory_read.kv_proj    column-wise by heads   (fused k|v of the memory slots: the memory keys/values follow
                                                   the heads, as does the segment KV cache in LayerState)
    memory_read.o_proj     row-wise
    memory.{query,key,value,update}  column-wise with gathered output (the write projections; the one-head write
                                     attention over M slots then runs on every tp rank, so the memory bank
                                     [B, M, D] stays replicated and identical on the tp ranks)
    ffn.gate_up_proj       column-wise            (fused gate|up: each rank keeps both halves of its channels)
    ffn.down_proj          row-wise

Embeddings, norms, the short convolution, the LM head and the compression gate stay replicated (the vocabulary is 259 bytes).
read_importance's per-slot bias is replicated too but read by every head, so its gradient is summed over the tp
group (`Block.shared_by_heads`).
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
    x = _reduce_grad(x, self._tp_group)
    weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight  # [chunks, out/tp/chunks, in]
    return F.linear(x, weight.reshape(-1, weight.shape[-1]))


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
        module.forward = types.MethodType(_fused_colwise_forward, module)
        return module


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    """The parallelize plan of one Block (only for the submodules this block has)."""
    plan: dict[str, ParallelStyle] = {
        "attn.qkv_proj": FusedColwiseParallel(3),
        "attn.o_proj": RowwiseParallel(),
        "ffn.gate_up_proj": FusedColwiseParallel(2),
        "ffn.down_proj": RowwiseParallel(),
        "memory_read.kv_proj": FusedColwiseParallel(2),
        "memory_read.q_proj": ColwiseParallel(),
        "memory_read.o_proj": RowwiseParallel(),
    }
    for name in ("query", "key", "value", "update"):  # the write projections
        plan[f"memory.{name}"] = ColwiseParallel(output_layouts=Replicate())
    present = {}
    for name, style in plan.items():
        try:
            sub = block.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(sub, nn.Linear):
            present[name] = style
    return present


def apply_tensor_parallel(blocks, tp_mesh: DeviceMesh) -> None:
    """Parallelize every block in place; each attention / memory-read module then works on its local heads."""
    tp = tp_mesh.size()
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan(block))
        block.attn.heads = block.attn.heads // tp
        block.shared_by_heads = functools.partial(_reduce_grad, group=tp_mesh.get_group())  # read_importance's bias
        if hasattr(getattr(block, "memory_read", None), "heads"):  # the delta read has none: it stays replicated
            block.memory_read.heads = block.memory_read.heads // tp


def canonical_shape(param: torch.Tensor) -> torch.Size:
    """The single-device shape of a (possibly TP-reshaped) parameter."""
    shape = param.shape
    return torch.Size([shape[0] * shape[1], *shape[2:]]) if len(shape) == 3 else shape
