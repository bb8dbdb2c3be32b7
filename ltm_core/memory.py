"""The long-term memory: its state, the compression gate, the gated write and the read.

Per memory layer, with hidden states h [B, T, C] of one segment and the memory mem [B, M, D]:

    c   = W_c h                                   compression       [B, T, D]
    s   = sigmoid(w_s . c)                        importance        [B, T, 1]
    g   = c * s                                   gated content     [B, T, D]
    new = softmax(Q(mem) K(g)^T / sqrt(D)) V(g)   slots read g      [B, M, D]
    u   = sigmoid(W_u [mem; new] + b_u)           update gate       [B, M, D]
    mem = (1 - u) * mem + u * new                 gated write       [B, M, D]

The write happens once a segment is complete, so a token only ever reads memory written by earlier segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm_core.attention import attention
from ltm_core.config import TitanConfig


@dataclass
class LayerState:
    """One layer's recurrent state."""

    memory: Optional[torch.Tensor]  # [B, M, D] memory at the start of the current segment (None: no memory)
    keys: Optional[torch.Tensor] = None  # [B, H, t, hd] keys of the t tokens already seen in the current segment
    values: Optional[torch.Tensor] = None  # [B, H, t, hd]
    gated: Optional[torch.Tensor] = None  # [B, t, D] gated content of those tokens, written at segment end

    def map(self, fn) -> "LayerState":
        return LayerState(*(None if t is None else fn(t) for t in (self.memory, self.keys, self.values, self.gated)))


@dataclass
class MemoryState:
    """Everything carried from one call of the model to the next.

    `layers[i].memory` is layer i's memory bank. When the last call ended inside a segment, `offset` tokens of
    that segment are pending and their keys/values/gated content are kept, so a continuation behaves exactly as
    one call over the whole input (this is also the KV cache used by generation). The size of the state is
    bounded by one segment, whatever the length already read.
    """

    layers: list[LayerState]
    offset: int = 0  # tokens of the current segment already read (0 <= offset < segment_length)
    segments: int = 0  # segments completed so far
    batch_size: int = field(default=0)

    def detach(self) -> "MemoryState":
        return MemoryState([ls.map(torch.Tensor.detach) for ls in self.layers], self.offset, self.segments,
                           self.batch_size)

    def to(self, *args, **kwargs) -> "MemoryState":
        return MemoryState([ls.map(lambda t: t.to(*args, **kwargs)) for ls in self.layers], self.offset,
                           self.segments, self.batch_size)

    @property
    def memory(self) -> list[Optional[torch.Tensor]]:
        return [ls.memory for ls in self.layers]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LongTermMemory(nn.Module):
    """A layer's memory bank: learned initial slots, the compression gate and the gated write."""

    def __init__(self, cfg: TitanConfig):
        super().__init__()
        C, M, D = cfg.hidden_size, cfg.memory_slots, cfg.memory_dim
        self.init_std = cfg.init_std
        self.gate_bias = cfg.update_gate_bias
        self.initial = nn.Parameter(torch.empty(M, D))  # learned initial memory
        self.norm = RMSNorm(C, cfg.norm_eps)
        self.compress = nn.Linear(C, D, bias=False)  # W_c
        self.importance = nn.Linear(D, 1)  # w_s
        self.query = nn.Linear(D, D, bias=False)  # Q(mem)
        self.key = nn.Linear(D, D, bias=False)  # K(g)
        self.value = nn.Linear(D, D, bias=False)  # V(g)
        self.update = nn.Linear(2 * D, D)  # W_u, b_u

    def reset_parameters(self) -> None:
        nn.init.normal_(self.initial, std=1.0)
        self.norm.reset_parameters()
        for lin in (self.compress, self.importance, self.query, self.key, self.value, self.update):
            nn.init.normal_(lin.weight, std=self.init_std)
        nn.init.zeros_(self.importance.bias)
        nn.init.constant_(self.update.bias, self.gate_bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.initial.unsqueeze(0).expand(batch_size, -1, -1)  # [B, M, D]

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, C] -> gated content g: [B, T, D]."""
        c = self.compress(self.norm(h))  # [B, T, D]
        s = torch.sigmoid(self.importance(c))  # [B, T, 1]
        return c * s

    def write(self, mem: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """mem: [B, M, D], g: [B, S, D] (one whole segment) -> updated memory [B, M, D]."""
        q = self.query(mem).unsqueeze(1)  # [B, 1, M, D]: one head
        k = self.key(g).unsqueeze(1)  # [B, 1, S, D]
        v = self.value(g).unsqueeze(1)  # [B, 1, S, D]
        new = attention(q, k, v, causal=False, backend="torch").squeeze(1)  # [B, M, D]
        u = torch.sigmoid(self.update(torch.cat([mem, new], dim=-1)))  # [B, M, D]
        return (1 - u) * mem + u * new


class MemoryRead(nn.Module):
    """Multi-head attention from the segment's tokens to the memory slots.

    `memory_read=cross`: a separate cross-attention sub-layer (this module's q/o projections).
    `memory_read=context`: only `kv()` is used; the slots become a non-causal prefix of the self-attention keys.
    """

    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.heads = cfg.num_memory_heads
        self.head_dim = cfg.hidden_size // self.heads
        self.init_std = cfg.init_std
        self.residual_std = cfg.init_std / (2 * cfg.num_hidden_layers) ** 0.5
        inner = self.heads * self.head_dim
        self.kv_proj = nn.Linear(cfg.memory_dim, 2 * inner, bias=False)
        self.cross = cfg.memory_read == "cross"
        if self.cross:
            self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
            self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.kv_proj.weight, std=self.init_std)
        if self.cross:
            nn.init.normal_(self.q_proj.weight, std=self.init_std)
            nn.init.normal_(self.o_proj.weight, std=self.residual_std)

    def kv(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mem: [B, M, D] -> keys, values [B, H, M, hd]."""
        B, M, _ = mem.shape
        k, v = self.kv_proj(mem).view(B, M, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, h: torch.Tensor, mem: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """h: [B, T, C] (normed), mem: [B, M, D] -> [B, T, C]."""
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k, v = self.kv(mem)
        y = attention(q, k, v, causal=False, backend=backend)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
