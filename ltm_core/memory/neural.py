"""`neural`: the Titans neural memory (Behrouz et al., 2024, arXiv 2501.00663, §3). Per layer and per sample the
memory is a small MLP M whose weights are the state, trained at test time on an associative loss:

    k_t = normalize(silu(W_k x_t)),  v_t = normalize(silu(W_v x_t))           key, value [D] (normalize_values)
    theta_t = lr sigmoid(w_theta . x_t),  eta_t = sigmoid(w_eta . x_t),  alpha_t = sigmoid(w_alpha . x_t)
    l_t = ||M_{t-1}(k_t) - v_t||^2                                           the token's "surprise" loss
    S_t = eta_t S_{t-1} - theta_t grad l_t                                    momentary + past surprise
    M_t = (1 - alpha_t) M_{t-1} + S_t                                         forgetting (weight decay)
    read: M*(q_t), q_t = normalize(silu(W_q x_t))                             a forward pass, no update

with x_t the layer's normed hidden state. M is `depth` 2: M(k) = W2 silu(W1 k) / sqrt(H), D -> H -> D (H =
`slots`; the fixed 1 / sqrt(H) makes a step theta act alike whatever the width: from the initial weights one write
at step theta moves the read at its key 2 theta E[silu(z)^2] ~ 0.71 theta of the way to its value), or `depth` 1:
M(k) = W k (Titans' linear memory, the delta rule with momentum and decay: theta = 0.5 overwrites). The initial
weights are learned; the momentum starts at zero.

Chunk-parallel form (§3.2). A segment is written in chunks of `chunk` tokens. Inside a chunk every gradient is
taken at the chunk's start weights M_0, so the c gradients come from one batched forward and backward of the MLP
(written out analytically: e = 2 (p - v), grad W2 = e h^T, grad W1 = ((W2^T e) * silu'(z) / sqrt(H)) k^T), and
the momentum and decay recurrences are linear, so they close in cumulative products: with A_t = prod_{j<=t} eta_j,
B_t = prod_{j<=t} (1 - alpha_j) and u_i = grad l_i(M_0),

    S_c = A_c S_0 - sum_i theta_i (A_c / A_i) u_i
    M_c = B_c M_0 + (sum_t (B_c / B_t) A_t) S_0 - sum_i theta_i (sum_{t>=i} (B_c / B_t) (A_t / A_i)) u_i

(ratios as exp of differences of cumulative log sums: every exponent is <= 0). Each weighted sum of the u_i is one
matmul (sum_i w_i e_i h_i^T = (w e)^T h), never c separate gradients. `chunk` 1 is the token-by-token rule
exactly (tests/memory/test_neural.py checks the chunked update against a token-by-token loop with autograd
gradients, in float64). The update runs in fp32 or wider, with autocast off.

Placements (`placement`, the paper's §4), each reading the memory as it was before the segment (a token reads
only what earlier segments wrote; inside the segment the attention carries the context):

    mac  memory as context: the segment retrieves `retrieved` tokens M*(q_m) (q_m learned queries), the self-
         attention reads [persistent; retrieved; segment] (`prefix`), and the memory is then written with the
         state after that attention: retrieve -> attend -> update, the paper's order. The write depends on the
         memory's own read, so a window runs segment by segment (slower).
    mag  memory as gate: a gated residual after the self-attention, x += sigmoid(W_g n) * W_o M*(q(n)), n the
         normed state after attention; written from the block's normed input, so a window runs layer by layer.
    mal  memory as a layer: a residual read before the self-attention, x += W_o M*(q(norm x)) (`read_before`),
         the attention then reads the result; written from the block's normed input (layer by layer).

Where this departs from the paper, and why:
- MAC queries the memory with learned queries, not with the segment's tokens: every retrieved token is visible to
  every query of the segment (a prefix), so a token retrieved with a later token's query would leak that token to
  the earlier ones under a causal LM loss. MAC's last step, o_t = y_t * M*_t(y_t), reads the memory after the
  segment's own update, which leaks the same way; it is left out (the block's FFN follows the attention as in the
  other kinds).
- MAG queries the memory from the state after attention (the interface's read position), the paper from the
  block's input; the gate sees both branches through it.
- Inside a segment, reads see the memory before the segment: the chunk size shapes the write only.
- Values are l2-normalised as the keys are (the paper normalises queries and keys only). With free values the
  outer training grew them (|v| to ~7 in layer 1 of the babi_facts recipe by step 190) and with them W2, and so
  the curvature of the loss in W1, until the inner gradient steps diverged (NaN); unit values keep the inner
  problem's scale fixed, and W_o scales the read. `normalize_values=false` gives the paper's free values; a
  checkpoint stored before the option existed was trained with them and loads with false
  (`ltm_core.migration.complete_stored_config`): the same weights with the other values compute another function.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm_core.config import TitanConfig
from ltm_core.layers import RMSNorm
from ltm_core.memory.base import Memory, Prefix, Write

PLACEMENTS = ("mac", "mag", "mal")


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    """d silu(z) / dz."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class NeuralMemory(Memory):
    kind = "neural"

    def __init__(self, cfg: TitanConfig):
        super().__init__(cfg)
        c = self.config
        C, D, H = cfg.hidden_size, c.dim, c.slots
        self.placement, self.dim, self.depth, self.hidden = c.placement, D, c.depth, H
        self.writes = "attended" if c.placement == "mac" else "normed"
        shapes = [(H, D), (D, H)] if c.depth == 2 else [(D, D)]  # W1 [H, D], W2 [D, H] | W [D, D]
        self.initial = nn.ParameterList(nn.Parameter(torch.empty(s)) for s in shapes)  # the learned initial M
        self.norm = RMSNorm(C, cfg.norm_eps, cfg.kernels)
        self.kv = nn.Linear(C, 2 * D, bias=False)  # W_k | W_v
        self.gates = nn.Linear(C, 3)  # theta, eta, alpha logits
        self.out = nn.Linear(D, C, bias=False)  # W_o: a retrieved value into the residual stream
        if c.placement == "mac":
            self.queries = nn.Parameter(torch.empty(c.retrieved, D))  # q_m, learned
            self.retrieved_norm = RMSNorm(C, cfg.norm_eps, cfg.kernels)  # retrieved tokens at the attention's scale
        else:
            self.query = nn.Linear(C, D, bias=False)  # W_q
        if c.placement == "mag":
            self.read_norm = RMSNorm(C, cfg.norm_eps, cfg.kernels)  # the state after attention, normed
            self.gate = nn.Linear(C, C)  # W_g
        if c.persistent:
            self.persistent = nn.Parameter(torch.empty(c.persistent, C))  # data-independent tokens

    @property
    def window_parallel(self) -> bool:
        """MAC writes the attention's output, which reads the memory (the prefix): segment by segment."""
        return self.placement != "mac"

    def reset_parameters(self) -> None:
        if self.depth == 2:
            nn.init.normal_(self.initial[0], std=1.0)  # z = W1 k ~ N(0, 1) for a unit key: silu is non-linear
            nn.init.zeros_(self.initial[1])  # M(k) = 0 until written
        else:
            nn.init.zeros_(self.initial[0])
        self.norm.reset_parameters()
        nn.init.normal_(self.kv.weight, std=self.init_std)
        nn.init.normal_(self.gates.weight, std=self.init_std)
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([0.0, self.config.momentum_bias, self.config.decay_bias]))
        nn.init.normal_(self.out.weight, std=self.residual_std)
        if self.placement == "mac":
            nn.init.normal_(self.queries, std=1.0)
            self.retrieved_norm.reset_parameters()
        else:
            nn.init.normal_(self.query.weight, std=self.init_std)
        if self.placement == "mag":
            self.read_norm.reset_parameters()
            nn.init.normal_(self.gate.weight, std=self.init_std)
            nn.init.zeros_(self.gate.bias)  # sigmoid(0) = 0.5
        if self.config.persistent:
            nn.init.normal_(self.persistent, std=1.0)  # the scale of the normed tokens beside them

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """(weights of M, then their momenta S = 0), each [B, ...]."""
        weights = tuple(w.unsqueeze(0).expand(batch_size, *w.shape) for w in self.initial)
        return weights + tuple(torch.zeros_like(w) for w in weights)

    # ------------------------------------------------------------------------------------------------ write
    def entries(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, C] -> what each token writes [B, T, 2 D + 3]: its key and value before the activation, and the
        logits of theta, eta and alpha."""
        n = self.norm(h)
        return torch.cat([self.kv(n), self.gates(n)], dim=-1)

    def forward_mlp(self, weights: tuple[torch.Tensor, ...], k: torch.Tensor):
        """M(k) for weights of batch B, k [B, N, D] -> (p [B, N, D], z [B, N, H], h [B, N, H]); depth 1: z = h = k."""
        if self.depth == 1:
            return k @ weights[0].transpose(1, 2), k, k
        z = k @ weights[0].transpose(1, 2)  # [B, N, H]
        h = F.silu(z) / math.sqrt(self.hidden)
        return h @ weights[1].transpose(1, 2), z, h  # [B, N, D]

    def weighted_grads(self, weights, k, e, z, h, scales: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """sum_i w_i grad l_i for each weighting w [B, c] in scales [B, c, n], the gradients of
        l_i = ||M(k_i) - v_i||^2 at `weights`, from e = 2 (M(k) - v) [B, c, D] and the forward's z, h: one matmul
        per weight matrix for all n weightings -> per weighting, a gradient per weight matrix."""
        n = scales.shape[-1]
        w = scales.unsqueeze(-1)  # [B, c, n, 1]

        def outer(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:  # [B, c, L], [B, c, R] -> [B, n, L, R]
            return ((left.unsqueeze(2) * w).flatten(2).transpose(1, 2) @ right).unflatten(1, (n, left.shape[-1]))

        if self.depth == 1:
            return [(g,) for g in outer(e, k).unbind(1)]  # [B, D, D]
        delta = (e @ weights[1]) * silu_grad(z) / math.sqrt(self.hidden)  # [B, c, H]: dl / dz
        return list(zip(outer(delta, k).unbind(1), outer(e, h).unbind(1)))  # [B, H, D], [B, D, H]

    def write(self, state: tuple[torch.Tensor, ...], entries: torch.Tensor, noise=None) -> Write:
        """state: (M, S) of batch B, entries: [B, T, 2 D + 3] one complete segment -> the state after it, chunk by
        chunk (module docstring), in fp32 or wider with autocast off."""
        dtype = state[0].dtype
        dt = torch.promote_types(dtype, torch.float32)
        n, D, T, c = len(self.initial), self.dim, entries.shape[1], self.config.chunk
        with torch.autocast(entries.device.type, enabled=False):
            x = entries.to(dt)
            k = F.normalize(F.silu(x[..., :D]), dim=-1)  # [B, T, D]
            v = F.silu(x[..., D:2 * D])  # [B, T, D]
            if self.config.normalize_values:
                v = F.normalize(v, dim=-1)
            logits = x[..., 2 * D:]  # [B, T, 3]
            gates = torch.stack([self.config.lr * torch.sigmoid(logits[..., 0]),  # theta
                                 F.logsigmoid(logits[..., 1]),  # log eta
                                 F.logsigmoid(-logits[..., 2])], dim=-1)  # log (1 - alpha)   [B, T, 3]
            full = T // c * c  # the chunks' coefficients do not depend on the memory: all at once
            coefficients = [] if full == 0 else list(zip(*(t.unbind(1) for t in chunk_coefficients(
                gates[:, :full].unflatten(1, (full // c, c))))))
            if full < T:  # a shorter last chunk
                coefficients += list(zip(*(t.unbind(1) for t in chunk_coefficients(gates[:, full:].unsqueeze(1)))))
            weights = tuple(s.to(dt) for s in state[:n])
            momenta = tuple(s.to(dt) for s in state[n:])
            for j, start in enumerate(range(0, T, c)):
                part = slice(start, start + c)
                weights, momenta = self._chunk(weights, momenta, k[:, part], v[:, part], *coefficients[j])
        return Write(tuple(s.to(dtype) for s in weights + momenta))

    def _chunk(self, weights, momenta, k, v, scales, keep, from_momenta, carry):
        """One chunk: k, v [B, c, D] and its coefficients (`chunk_coefficients`) -> (M_c, S_c), from gradients
        taken at the chunk's start weights."""
        p, z, h = self.forward_mlp(weights, k)
        e = 2 * (p - v)  # [B, c, D]: dl / dp
        to_weights, to_momenta = self.weighted_grads(weights, k, e, z, h, scales)
        new_weights = tuple(bcast(keep, w) * w + bcast(from_momenta, s) * s - g
                            for w, s, g in zip(weights, momenta, to_weights))
        new_momenta = tuple(bcast(carry, s) * s - g for s, g in zip(momenta, to_momenta))
        return new_weights, new_momenta

    # ------------------------------------------------------------------------------------------------- read
    def retrieve(self, state: tuple[torch.Tensor, ...], q: torch.Tensor) -> torch.Tensor:
        """M*(q): q [B, N, D] (any dtype) -> W_o M(normalize(silu(q))) [B, N, C], M in fp32 or wider."""
        weights = state[:len(self.initial)]
        dt = torch.promote_types(weights[0].dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            p, _, _ = self.forward_mlp(tuple(w.to(dt) for w in weights), F.normalize(F.silu(q.to(dt)), dim=-1))
        return self.out(p.to(q.dtype))

    def prefix(self, state: tuple[torch.Tensor, ...]) -> Optional[Prefix]:
        """MAC: [persistent; the retrieved tokens M*(q_m)] [B, P + R, C]; MAG/MAL: the persistent tokens or None."""
        B = state[0].shape[0]
        tokens = []
        if self.config.persistent:
            tokens.append(self.persistent.unsqueeze(0).expand(B, -1, -1))
        if self.placement == "mac":
            q = self.queries.unsqueeze(0).expand(B, -1, -1)  # [B, R, D]
            tokens.append(self.retrieved_norm(self.retrieve(state, q)))
        return Prefix(torch.cat([t.to(tokens[-1].dtype) for t in tokens], dim=1)) if tokens else None

    def read_before(self, h: torch.Tensor, state: tuple[torch.Tensor, ...]) -> Optional[torch.Tensor]:
        """MAL: h [B, T, C] the block's normed input -> W_o M*(W_q h) [B, T, C]."""
        if self.placement != "mal":
            return None
        return self.retrieve(state, self.query(h))

    def read(self, h: torch.Tensor, state: tuple[torch.Tensor, ...]) -> Optional[torch.Tensor]:
        """MAG: h [B, T, C] the state after attention -> sigmoid(W_g n) * W_o M*(W_q n), n = norm(h)."""
        if self.placement != "mag":
            return None
        n = self.read_norm(h)
        return torch.sigmoid(self.gate(n)) * self.retrieve(state, self.query(n))

    def flops_per_token(self, segment_length: int) -> float:
        """With p the memory's weights (2 D H, or D^2): the write's forward, backward and weighted sums of the
        chunk (about 6 p per token) and the read (2 p per query: every token for MAG/MAL, `retrieved` per segment
        for MAC), times 3 for training, less the 6 p that 6N already counts for the initial weights."""
        p = sum(w.numel() for w in self.initial)
        reads = self.config.retrieved / segment_length if self.placement == "mac" else 1.0
        return 3 * (6 * p + 2 * p * reads) - 6 * p


def chunk_coefficients(gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """gates [B, N, c, 3]: theta, log eta, log (1 - alpha) of N chunks of c tokens -> what turns a chunk's gradients
    u_i (at its start weights) and its start state (M_0, S_0) into its end state, with A_t = prod_{j<=t} eta_j and
    B_t = prod_{j<=t} (1 - alpha_j) inside the chunk (module docstring):

        scales [B, N, c, 2]  theta_i sum_{t>=i} (B_c / B_t) (A_t / A_i)  (M_c's weight of u_i), theta_i A_c / A_i (S_c's)
        keep [B, N]          B_c                    M_c's weight of M_0
        from_momenta [B, N]  sum_t (B_c / B_t) A_t  M_c's weight of S_0
        carry [B, N]         A_c                    S_c's weight of S_0

    Ratios are exp of differences of cumulative log sums, every exponent <= 0."""
    theta, la, lb = gates[..., 0], gates[..., 1].cumsum(-1), gates[..., 2].cumsum(-1)  # [B, N, c]: log A_t, log B_t
    c = gates.shape[2]
    later = torch.ones(c, c, dtype=torch.bool, device=gates.device).tril()  # [t, i]: t >= i
    ratio = (la.unsqueeze(-1) - la.unsqueeze(-2)).masked_fill(~later, -math.inf).exp()  # [B, N, t, i]: A_t / A_i
    decay = (lb[..., -1:] - lb).exp()  # [B, N, c]: B_c / B_t
    to_weights = theta * (decay.unsqueeze(-2) @ ratio).squeeze(-2)  # [B, N, c]
    to_momenta = theta * ratio[..., -1, :]  # [B, N, c]
    return (torch.stack([to_weights, to_momenta], dim=-1), lb[..., -1].exp(), (decay * la.exp()).sum(-1),
            la[..., -1].exp())


def bcast(scale: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """scale [B] -> viewed to multiply t [B, ...]."""
    return scale.view(-1, *([1] * (t.dim() - 1)))
