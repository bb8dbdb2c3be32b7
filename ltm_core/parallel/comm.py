"""Measure communication: a TorchDispatchMode that records every collective and point-to-point message.

It sees what `torch.distributed.tensor.debug.CommDebugMode` sees (functional collectives issued by DTensor,
c10d collectives issued by FSDP2, DDP and explicit `dist.*` calls) and, in addition, the pipeline's send/recv,
and it records sizes, not only counts. Like CommDebugMode it returns NotImplemented for DTensor arguments so that
DTensor first lowers its operations to collectives.

Payload convention (per rank, the bytes of the buffer a rank hands to the operation):
    all-reduce, broadcast      the tensor
    all-gather                 the gathered output (group size × input)
    reduce-scatter             the full input (group size × output)
    send                       the message (receives are recorded separately and not added to the volume)
A ring all-reduce moves about 2 (n-1)/n of its payload over each rank's link, all-gather and reduce-scatter
(n-1)/n: multiply by these factors for wire bytes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

_F = torch.ops._c10d_functional
_C = torch.ops.c10d


def _bytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(t) for t in x)
    return 0


def _kinds() -> dict:
    """op overload packet -> (kind, which argument holds the payload, multiply by group size?)."""
    table: dict = {}

    def add(namespace, name, kind, arg, times_group=False):
        packet = getattr(namespace, name, None)
        if packet is not None:
            table[packet] = (kind, arg, times_group)

    add(_F, "all_reduce", "all_reduce", 0)
    add(_F, "all_reduce_", "all_reduce", 0)
    add(_F, "all_reduce_coalesced", "all_reduce", 0)
    add(_F, "all_gather_into_tensor", "all_gather", 0, True)
    add(_F, "all_gather_into_tensor_coalesced", "all_gather", 0, True)
    add(_F, "reduce_scatter_tensor", "reduce_scatter", 0)
    add(_F, "reduce_scatter_tensor_coalesced", "reduce_scatter", 0)
    add(_F, "broadcast", "broadcast", 0)
    add(_F, "all_to_all_single", "all_to_all", 0)
    add(_C, "allreduce_", "all_reduce", 0)
    add(_C, "allreduce_coalesced_", "all_reduce", 0)
    add(_C, "_allgather_base_", "all_gather", 0)  # (output, input, ...)
    add(_C, "allgather_", "all_gather", 0)
    add(_C, "allgather_into_tensor_coalesced_", "all_gather", 0)
    add(_C, "allgather_coalesced_", "all_gather", 0)
    add(_C, "_reduce_scatter_base_", "reduce_scatter", 1)  # (output, input, ...)
    add(_C, "reduce_scatter_", "reduce_scatter", 1)
    add(_C, "reduce_scatter_tensor_coalesced_", "reduce_scatter", 1)
    add(_C, "broadcast_", "broadcast", 0)
    add(_C, "alltoall_base_", "all_to_all", 1)
    add(_C, "alltoall_", "all_to_all", 1)
    add(_C, "send", "send", 0)
    add(_C, "recv_", "recv", 0)
    add(_C, "recv_any_source_", "recv", 0)
    return table


class CommCounter(TorchDispatchMode):
    """with CommCounter() as comm: ...; comm.bytes -> {kind: bytes}, comm.counts -> {kind: calls}.

    `min_bytes`: messages smaller than this are counted under "scalars" (loss / gradient-norm bookkeeping).
    """

    def __init__(self, min_bytes: int = 64):
        super().__init__()
        self.table = _kinds()
        self.min_bytes = min_bytes
        self.bytes: dict[str, int] = defaultdict(int)
        self.counts: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t is DTensor or (isinstance(t, type) and issubclass(t, DTensor)) for t in types):
            return NotImplemented  # let DTensor lower the op to collectives first
        out = func(*args, **kwargs)
        entry = self.table.get(getattr(func, "_overloadpacket", None))
        if entry is not None:
            kind, arg, times_group = entry
            size = _bytes(args[arg]) if len(args) > arg else 0
            if times_group:
                size *= int(args[1]) if len(args) > 1 and isinstance(args[1], int) else 1
            if size < self.min_bytes and kind != "recv":
                kind = "scalars"
            self.bytes[kind] += size
            self.counts[kind] += 1
        return out

    @property
    def volume(self) -> int:
        """Payload bytes handed to collectives and sends (receives and scalar bookkeeping excluded)."""
        return sum(v for k, v in self.bytes.items() if k not in ("recv", "scalars"))
