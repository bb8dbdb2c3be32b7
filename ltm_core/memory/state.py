"""The recurrent state a TitanModel carries from one call to the next."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

# A memory kind's own state: one tensor ([B, M, D] for tokens, slots and delta) or a tuple of tensors.
State = Any


def map_state(state: State, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
    """Apply fn to every tensor of a memory state (a tensor, a tuple of them, or None)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    return tuple(map_state(s, fn) for s in state)


def stack_states(states: list[State]) -> State:
    """W states with batch B -> one state with batch B * W, batch element b * W + i holding states[i][b] (the
    layout of a window's segments in the layer-major pass)."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(states, dim=1).flatten(0, 1)
    return tuple(stack_states([s[j] for s in states]) for j in range(len(first)))


@dataclass
class LayerState:
    """One layer's recurrent state."""

    memory: State  # the memory kind's state at the start of the current segment (None: no memory)
    keys: Optional[torch.Tensor] = None  # [B, H, t, hd] keys of the t tokens already read in the current segment
    values: Optional[torch.Tensor] = None  # [B, H, t, hd]
    pending: Optional[torch.Tensor] = None  # [B, t, D] what those tokens write, at the segment's end
    shift: Optional[torch.Tensor] = None  # [B, K - 1, C] short_conv=K: the block inputs of the last K - 1 tokens

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LayerState":
        return LayerState(map_state(self.memory, fn), *(None if t is None else fn(t)
                                                        for t in (self.keys, self.values, self.pending, self.shift)))


@dataclass
class MemoryState:
    """Everything carried from one call of the model to the next.

    `layers[i].memory` is layer i's memory. When the last call ended inside a segment, `offset` tokens of that
    segment are pending and their keys/values and write entries are kept, so a continuation behaves exactly as one
    call over the whole input (this is also the KV cache used by generation). The size of the state is bounded by
    one segment, whatever the length already read. `noise` holds the training noise of the current BPTT window's
    writes ([bptt_segments, layers, ...], drawn once per window), so a window gives the same result whether it is
    read in one call or segment by segment.
    """

    layers: list[LayerState]
    offset: int = 0  # tokens of the current segment already read (0 <= offset < segment_length)
    segments: int = 0  # segments completed so far
    batch_size: int = field(default=0)
    noise: Optional[torch.Tensor] = None  # the current window's write noise (training), or None

    def detach(self) -> "MemoryState":
        return MemoryState([ls.map(torch.Tensor.detach) for ls in self.layers], self.offset, self.segments,
                           self.batch_size, self.noise)

    def to(self, *args, **kwargs) -> "MemoryState":
        return MemoryState([ls.map(lambda t: t.to(*args, **kwargs)) for ls in self.layers], self.offset,
                           self.segments, self.batch_size,
                           None if self.noise is None else self.noise.to(*args, **kwargs))

    @property
    def memory(self) -> list[State]:
        return [ls.memory for ls in self.layers]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (memories, the current segment's keys/values, pending entries, carries)."""
        out: list[torch.Tensor] = []
        for ls in self.layers:
            ls.map(lambda t: out.append(t) or t)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
