"""`slots`: the seed design. M learned slots, a compression gate, a gated write and a cross-attention read.

Per layer, with the block outputs h [B, S, C] of one complete segment and the memory mem [B, M, D]:

    c   = W_c norm(h)                             compression       [B, S, D]
    g   = c * sigmoid(w . c)                      gated content     [B, S, D]
    new = softmax(Q(mem) K(g)^T / sqrt(D)) V(g)   slots read g      [B, M, D]
    u   = sigmoid(W_u [mem; new] + b_u)           update gate       [B, M, D]
    mem = (1 - u) * mem + u * new                 gated write       [B, M, D]

and the tokens read it by a multi-head cross-attention sub-layer after the self-attention:
x += O softmax(Q norm(x) K(mem)^T) V(mem). It writes the block's output, which depends on its own read, so a window
runs segment by segment. Kept as the seed-faithful baseline; no measurement shows it helping (README.md,
"Memory kinds").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ltm_core import ops
from ltm_core.attention import attention
from ltm_core.config import TitanConfig
from ltm_core.layers import RMSNorm
from ltm_core.memory.base import Memory, Write


class CrossRead(nn.Module):
    """Multi-head attention from the segment's tokens to the memory slots."""

    def __init__(self, cfg: TitanConfig, heads: int, dim: int):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, cfg.hidden_size // heads, cfg.kernels
        inner = self.heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * inner, bias=False)  # fused k|v of the slots
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """h: [B, T, C] (normed), mem: [B, M, D] -> [B, T, C]."""
        B, T, _ = h.shape
        M = mem.shape[1]
        q = self.q_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd] (-1: local heads under TP)
        k, v = self.kv_proj(mem).view(B, M, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, M, hd]
        y = attention(q, k, v, causal=False, backend=self.backend)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SlotsMemory(Memory):
    kind = "slots"
    writes = "block"

    def __init__(self, cfg: TitanConfig):
        super().__init__(cfg)
        C, M, D = cfg.hidden_size, self.config.slots, self.config.dim
        self.initial = nn.Parameter(torch.empty(M, D))  # learned initial memory
        self.norm = RMSNorm(C, cfg.norm_eps, cfg.kernels)
        self.compress = nn.Linear(C, D, bias=False)  # W_c
        self.importance = nn.Linear(D, 1)  # w
        self.query = nn.Linear(D, D, bias=False)  # Q(mem)
        self.key = nn.Linear(D, D, bias=False)  # K(g)
        self.value = nn.Linear(D, D, bias=False)  # V(g)
        self.update = nn.Linear(2 * D, D)  # W_u, b_u
        self.read_norm = RMSNorm(C, cfg.norm_eps, cfg.kernels)
        self.reader = CrossRead(cfg, self.config.heads or cfg.num_attention_heads, D)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.initial, std=1.0)
        self.norm.reset_parameters()
        self.read_norm.reset_parameters()
        for linear in (self.compress, self.importance, self.query, self.key, self.value, self.update,
                       self.reader.q_proj, self.reader.kv_proj):
            nn.init.normal_(linear.weight, std=self.init_std)
        nn.init.normal_(self.reader.o_proj.weight, std=self.residual_std)
        nn.init.zeros_(self.importance.bias)
        nn.init.constant_(self.update.bias, self.config.update_gate_bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.initial.unsqueeze(0).expand(batch_size, -1, -1)  # [B, M, D]

    def entries(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, C] block outputs -> gated content c * sigmoid(w . c) [B, T, D]."""
        c = self.compress(self.norm(h))  # [B, T, D]
        return ops.compress_gate(c, self.importance(c), self.backend)

    def write(self, state: torch.Tensor, entries: torch.Tensor, noise=None) -> Write:
        """state: [B, M, D], entries: [B, S, D] gated content of one segment -> the gated update [B, M, D]."""
        q = self.query(state).unsqueeze(1)  # [B, 1, M, D]: one head
        k = self.key(entries).unsqueeze(1)  # [B, 1, S, D]
        v = self.value(entries).unsqueeze(1)  # [B, 1, S, D]
        new = attention(q, k, v, causal=False, backend="torch").squeeze(1)  # [B, M, D]
        update_logits = self.update(torch.cat([state, new], dim=-1))  # [B, M, D]
        return Write(ops.memory_update(state, new, update_logits, self.backend))  # (1 - u) mem + u new

    def read(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.reader(self.read_norm(h), state)

    def flops_per_token(self, segment_length: int) -> float:
        """The read over M slots (12 C M), the write attention (12 M D per token), and the slots' key/value
        projection, which runs on M slots once per segment (M / T times per token, not once as 6N counts it)."""
        C, M, D, T = self.model_config.hidden_size, self.config.slots, self.config.dim, segment_length
        return 12 * C * M + 12 * M * D + 6 * self.reader.kv_proj.weight.numel() * (M / T - 1)
