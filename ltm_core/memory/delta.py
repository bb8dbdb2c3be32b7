"""`delta`: an associative memory. Per layer a linear map mem [B, M, D] from D-wide keys to M-wide values, written
token by token with the delta rule (Titans' linear memory with one gradient step per token on ||mem k - v||^2;
DeltaNet) and read by mapping the query:

    c_t = W_c norm(x_t)                                                the state after self-attention, compressed
    k_t = normalize(K c_t),  v_t = V c_t,  b_t = sigmoid(w . c_t)      key [D], value [M], write strength
    mem = mem + b_t (v_t - mem k_t) k_t^T        for t = 1..S          replaces what k_t held by v_t
    read: x += O (mem normalize(Q norm(x)))                             [B, T, M] -> [B, T, C]

A key written again overwrites its value instead of piling up (later facts overwrite earlier ones), and a token
written with b ~ 0 leaves the map as it was. The S sequential updates of a segment are computed at once: with
A = strict_lower(diag(b) K K^T), U = (I + A)^-1 diag(b) (V - K mem^T), mem += U^T K. It writes the state after the
self-attention, before its own read, so a window runs layer by layer; the recurrence steps through its segments.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm_core.config import TitanConfig
from ltm_core.layers import RMSNorm
from ltm_core.memory.base import Memory, Write


def unit_lower_solve(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(I + a)^-1 r by forward substitution, a [B, S, S] strictly lower triangular, r [B, S, M] -> u [B, S, M]:
    u_t = r_t - a[t, :t] u[:t], one row at a time (S small ops, where `torch.linalg.solve_triangular` is one call:
    the exported graphs' form of the delta write, which ONNX has no operator for)."""
    u = r[:, :1]
    for t in range(1, r.shape[1]):
        u = torch.cat([u, r[:, t:t + 1] - a[:, t:t + 1, :t] @ u], dim=1)  # [B, t + 1, M]
    return u


class DeltaRead(nn.Module):
    """y = O (mem normalize(Q h))."""

    def __init__(self, cfg: TitanConfig, slots: int, dim: int):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, dim, bias=False)  # Q
        self.out = nn.Linear(slots, cfg.hidden_size, bias=False)  # O

    def forward(self, h: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """h: [B, T, C] (normed), mem: [B, M, D] -> [B, T, C]."""
        q = F.normalize(self.query(h).float(), dim=-1)  # [B, T, D]
        y = q @ mem.float().transpose(1, 2)  # [B, T, M]
        return self.out(y.to(h.dtype))


class DeltaMemory(Memory):
    kind = "delta"
    writes = "attended"

    def __init__(self, cfg: TitanConfig):
        super().__init__(cfg)
        C, M, D = cfg.hidden_size, self.config.slots, self.config.dim
        self.initial = nn.Parameter(torch.empty(M, D))  # the learned initial map
        self.norm = RMSNorm(C, cfg.norm_eps, cfg.kernels)
        self.compress = nn.Linear(C, D, bias=False)  # W_c
        self.importance = nn.Linear(D, 1)  # w: write strength
        self.key = nn.Linear(D, D, bias=False)  # K
        self.value = nn.Linear(D, M, bias=False)  # V
        self.read_norm = RMSNorm(C, cfg.norm_eps, cfg.kernels)
        self.reader = DeltaRead(cfg, M, D)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.initial)  # the map starts empty (learned from there)
        self.norm.reset_parameters()
        self.read_norm.reset_parameters()
        for linear in (self.compress, self.importance, self.key, self.value, self.reader.query):
            nn.init.normal_(linear.weight, std=self.init_std)
        nn.init.normal_(self.reader.out.weight, std=self.residual_std)
        nn.init.zeros_(self.importance.bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.initial.unsqueeze(0).expand(batch_size, -1, -1)  # [B, M, D]

    def entries(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, C] the state after self-attention -> compressed tokens [B, T, D]."""
        return self.compress(self.norm(h))

    def write(self, state: torch.Tensor, entries: torch.Tensor, noise=None) -> Write:
        """The delta rule over the segment's S tokens in one triangular solve (module docstring), in fp32 or wider."""
        S = entries.shape[1]
        dt = torch.promote_types(state.dtype, torch.float32)  # at least fp32 (the solve under bf16 autocast)
        k = F.normalize(self.key(entries).to(dt), dim=-1)  # [B, S, D]
        v = self.value(entries).to(dt)  # [B, S, M]
        b = torch.sigmoid(self.importance(entries).to(dt))  # [B, S, 1]
        w = state.to(dt)  # [B, M, D]
        a = torch.tril(b * (k @ k.transpose(1, 2)), diagonal=-1)  # [B, S, S]: b_t k_t . k_i for i < t
        r = b * (v - k @ w.transpose(1, 2))  # [B, S, M]
        if torch.compiler.is_exporting():  # ONNX has no triangular solve (`ltm export --format onnx`)
            u = unit_lower_solve(a, r)
        else:
            eye = torch.eye(S, dtype=a.dtype, device=a.device)
            u = torch.linalg.solve_triangular(eye + a, r, upper=False)  # [B, S, M]
        return Write((w + u.transpose(1, 2) @ k).to(state.dtype))  # [B, M, D]

    def read(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.reader(self.read_norm(h), state)

    def flops_per_token(self, segment_length: int) -> float:
        """The write's solve and update (about 6 M D + 3 S (D + M)) and the read mem @ q (6 M D)."""
        M, D, S = self.config.slots, self.config.dim, segment_length
        return 12 * M * D + 3 * S * (D + M)
