"""The long-term memory: its state, the compression gate, the gated write and the read.

Per memory layer, with hidden states h [B, T, C] of one segment (the block's output, or with
`write_from=attention` the state after self-attention, before the memory read) and the memory mem [B, M, D]:

    c   = W_c h                                   compression       [B, T, D]
    s   = sigmoid(w_s . c)                        importance        [B, T, 1]
    g   = c * s                                   gated content     [B, T, D]
    new = softmax(Q(mem) K(g)^T / sqrt(D)) V(g)   slots read g      [B, M, D]
    u   = sigmoid(W_u [mem; new] + b_u)           update gate       [B, M, D]
    mem = (1 - u) * mem + u * new                 gated write       [B, M, D]

With `memory_write=importance` the importance decides how much is written, not only what:

    g   = c                                                    content (the write reads s itself)    [B, T, D]
    a   = softmax(Q(mem) K(c)^T / sqrt(D) + log s)             slots read tokens in proportion to s  [B, M, T]
    r   = sum_t softmax(Q(mem) K(c)^T / sqrt(D))_t s_t         write strength: importance read       [B, M, 1]
    new = a V(c)
    u   = r * sigmoid(W_u [mem; new] + b_u)                     [B, M, D]
    mem = (1 - u) * mem + u * new

A segment whose tokens all have s ~ 0 (filler) leaves the memory as it was, however many such segments follow,
which is what lets a memory trained on a few segments keep a needle over hundreds.

With `memory_write=select` the memory is a cache of the M most important compressed tokens seen so far:

    cand = [mem; c]                                            the memory's entries and the segment's tokens
    mem  = the M entries of cand with the highest w_s . cand   (in arrival order)

An entry leaves only when M more important tokens have arrived, so retention does not depend on the distance.
In training the ranking is w_s . cand + select_noise * std(w_s . cand) * Gumbel noise (Gumbel-top-k: M entries
sampled without replacement from softmax(w_s . cand / (select_noise * std))): tokens the ranking would drop are
sometimes kept, and importance learns from them; the memory the read sees in training then mixes needles with
strong filler, as it does after thousands of segments. The spread scaling keeps the sampling on however large the
importance grows. Evaluation and generation rank without noise. `importance_penalty` = lambda adds
lambda * mean_t sigmoid(w_s . c_t) over each written segment's tokens to the training loss (by the write's
backward, as MoE auxiliary losses are added): only kept entries learn from the reads, so at the training length
filler may rank close to a needle at no cost, and over a long haystack the repeated filler that outranks it fills
the slots; the penalty lowers every token the reads do not hold up. With `read_importance` the read adds
log sigmoid(w_s . entry) to each entry's attention scores (the `key_bias` of `attention()`), so the importance that
decides what is kept is also what the read weighs, and it learns from every read. `slot_positions` adds a learned
vector per place before the read; the place is the slot index (`slot_order=arrival`: arrival order), or with
`slot_order=important` the entry's rank in arrival order among the entries with w_s . entry > 0, all others sharing
one vector: strong filler kept before a needle moves the needle's slot indices, not its rank among the important.
With `importance_relative` the penalty and the kept entries' straight-through factor use sigmoid(w_s . c - t)
instead, t the M-th highest importance among the candidates: they depend on the gaps to t, not on a common shift of
every importance (the penalty's cheapest way down, which leaves the ranking, all the write uses, as it was), so that
shift can neither saturate the sigmoid nor switch off what the reads teach the ranking.
`importance_zloss` = lambda_z adds lambda_z * mean_t (w_s . c_t)^2 (as the router z-loss of ST-MoE), which holds
the importances near 0 against that drift. `importance_detach` = a in [0, 1] withholds the share a of the penalty's
and the z-loss's gradient from c (and the layers below); at 1 they train w_s alone and cannot teach the compression
one shared direction that pushes every token's importance down at once, the penalty's other cheap way down.
`select_dedup` = tau ranks a candidate whose cosine similarity to a higher-ranked candidate exceeds tau after every
distinct one (near-duplicate suppression, as Fast NMS in detection): a periodic haystack (RULER's filler repeats every
90 characters) otherwise fills the slots with copies of its best-ranked filler token once it is long enough, and the
needle's weaker tokens lose their slots (README, "Where a long haystack beats the key").
`select_grad=logit` makes the kept entries' factor 1 + z - z.detach() with z = w_s . entry itself, the entry held
fixed (it trains w_s only; through the entries this unbounded signal unsettles the layers below and nothing is
learned): the sigmoid's slope s (1 - s) fades in the flat tail where the penalty leaves the importances, so the
reads stop teaching the ranking there; the logit's does not.
`read_qk_norm` RMS-normalises each head's read queries and slot keys (learned gains, as QK-norm in the self-attention
of recent LLMs), so a read score is sqrt(hd) times a cosine from the first step, whatever the entries' scale.

With `memory_write=delta` the memory is associative: mem [B, M, D] is a linear map from keys (D wide) to values
(M wide), written token by token with the delta rule (Titans' linear memory with one gradient step per token on
||mem k - v||^2; DeltaNet) and read by mapping the query:

    k_t = normalize(K c_t),  v_t = V c_t,  b_t = sigmoid(w_s . c_t)      key [D], value [M], write strength
    mem = mem + b_t (v_t - mem k_t) k_t^T        for t = 1..T            replaces what k_t held by v_t
    read: y = mem normalize(Q h)                                          [B, T, M] -> O -> [B, T, C]

A key written again overwrites its value instead of piling up (so "later facts overwrite earlier ones" is the
write's own behaviour), and filler written with b ~ 0 leaves the map as it was. The T sequential updates are
computed at once: with A = strict_lower(diag(b) K K^T), U = (I + A)^-1 diag(b) (V - K mem^T), mem += U^T K.

`memory_conv=K` first mixes each compressed token with its K - 1 predecessors (a causal depthwise convolution),
so an entry can be found by what preceded it (`memory_conv_mix=full`: a full convolution, each tap a D x D map, so
each predecessor can land in its own subspace of the entry). The convolution runs across segment boundaries, as one
over the whole input would: the state carries the last K - 1 compressed tokens of the previous segment
(`LayerState.tail`; zeros before the first segment). With `memory_write=delta` the convolution runs on the keys
only, after their projection (as Titans and DeltaNet place it): k_t = normalize(conv(K c)_t), so a token can be
stored under what preceded it while its value stays its own (key-value pairs: "aK" stores K under a).

With `memory_read=tokens` (select only, D = C) an entry is a token itself, as the self-attention sees it: the
write ranks the segment's normed self-attention inputs a_t = norm(x_t) (no compression), and the self-attention
reads the kept ones through its own key and value projections, beside the segment's keys:

    keys = [W_k mem ; rope(W_k a_1..T)],  values = [W_v mem ; W_v a_1..T]       the slots carry no position

so the read is the attention the model would do if the kept tokens were still in its window (a KV cache of the
important tokens, as Memorizing Transformers attend to retrieved past keys and values). Whatever the attention
learns inside a segment (matching a key by its predecessor with `short_conv`) then works across segments at once;
a separate read would have to learn it again from the few signals that cross a segment. The memory starts empty
(zeros): empty slots are masked out of the read and lose to any token in the write.

The write happens once a segment is complete, so a token only ever reads memory written by earlier segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm_core import ops
from ltm_core.attention import attention
from ltm_core.config import TitanConfig


@dataclass
class LayerState:
    """One layer's recurrent state."""

    memory: Optional[torch.Tensor]  # [B, M, D] memory at the start of the current segment (None: no memory)
    keys: Optional[torch.Tensor] = None  # [B, H, t, hd] keys of the t tokens already seen in the current segment
    values: Optional[torch.Tensor] = None  # [B, H, t, hd]
    gated: Optional[torch.Tensor] = None  # [B, t, D] gated content of those tokens, written at segment end
    tail: Optional[torch.Tensor] = None  # [B, K - 1, D] memory_conv=K: the last compressed tokens written before
    shift: Optional[torch.Tensor] = None  # [B, K - 1, C] short_conv=K: the block inputs of the segment's last K - 1 tokens

    def map(self, fn) -> "LayerState":
        return LayerState(*(None if t is None else fn(t)
                            for t in (self.memory, self.keys, self.values, self.gated, self.tail, self.shift)))


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
    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.backend)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, before: Optional[torch.Tensor]) -> torch.Tensor:
    """x: [B, S, D], weight: [D, 1 (depthwise) or D (full), K], before: [B, K - 1, D] what precedes x (None: zeros)
    -> the causal convolution [B, S, D]: output t mixes inputs t - K + 1 .. t (memory_conv, short_conv)."""
    kernel = weight.shape[-1]
    x = x.transpose(1, 2)  # [B, D, S]
    x = F.pad(x, (kernel - 1, 0)) if before is None else torch.cat([before.to(x.dtype).transpose(1, 2), x], 2)
    groups = x.shape[1] if weight.shape[1] == 1 else 1
    return F.conv1d(x, weight.to(x.dtype), groups=groups).transpose(1, 2)


class LongTermMemory(nn.Module):
    """A layer's memory bank: learned initial slots, the compression gate and the gated write."""

    def __init__(self, cfg: TitanConfig):
        super().__init__()
        C, M, D = cfg.hidden_size, cfg.memory_slots, cfg.memory_dim
        self.init_std = cfg.init_std
        self.gate_bias = cfg.update_gate_bias
        self.mode = cfg.memory_write
        self.select_noise = cfg.select_noise
        self.importance_penalty = cfg.importance_penalty
        self.importance_relative = cfg.importance_relative
        self.importance_zloss = cfg.importance_zloss
        self.importance_detach = cfg.importance_detach
        self.select_grad = cfg.select_grad
        self.select_dedup = cfg.select_dedup
        self.backend = cfg.kernels
        self.tokens = cfg.memory_read == "tokens"  # entries are the tokens' normed attention inputs, uncompressed
        self.slots = M
        if not self.tokens:  # (tokens: the memory starts empty, zeros)
            self.initial = nn.Parameter(torch.empty(M, D))  # learned initial memory
            self.norm = RMSNorm(C, cfg.norm_eps, cfg.kernels)
            self.compress = nn.Linear(C, D, bias=False)  # W_c
        self.importance = nn.Linear(D, 1)  # w_s
        if cfg.memory_conv:  # causal convolution over the compressed tokens: [D, 1, K] depthwise, [D, D, K] full
            self.conv = nn.Parameter(torch.empty(D, 1 if cfg.memory_conv_mix == "depthwise" else D, cfg.memory_conv))
        if self.mode == "delta":  # keys and values of the associative map
            self.key = nn.Linear(D, D, bias=False)  # K(c)
            self.value = nn.Linear(D, M, bias=False)  # V(c)
        elif self.mode != "select":  # the select write keeps entries as they are: no write attention, no gate
            self.query = nn.Linear(D, D, bias=False)  # Q(mem)
            self.key = nn.Linear(D, D, bias=False)  # K(g)
            self.value = nn.Linear(D, D, bias=False)  # V(g)
            self.update = nn.Linear(2 * D, D)  # W_u, b_u

    def reset_parameters(self) -> None:
        if self.mode == "delta":  # the map starts empty (learned from there)
            nn.init.zeros_(self.initial)
        elif not self.tokens:
            nn.init.normal_(self.initial, std=1.0)
        if hasattr(self, "norm"):
            self.norm.reset_parameters()
        for name in ("compress", "importance", "query", "key", "value", "update"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=self.init_std)
        nn.init.zeros_(self.importance.bias)
        if hasattr(self, "conv"):  # the token itself plus random mixes of its predecessors
            D, fan_in = self.conv.shape[0], self.conv.shape[1]  # fan_in 1 (depthwise) or D (full)
            nn.init.normal_(self.conv, std=0.5 / fan_in ** 0.5)
            with torch.no_grad():
                self.conv[:, :, -1] = 1.0 if fan_in == 1 else torch.eye(D)
        if hasattr(self, "update"):
            nn.init.constant_(self.update.bias, self.gate_bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        if self.tokens:  # empty slots
            return self.importance.weight.new_zeros(batch_size, self.slots, self.importance.in_features)  # [B, M, D]
        return self.initial.unsqueeze(0).expand(batch_size, -1, -1)  # [B, M, D]

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, C] -> what the segment end writes from: gated content c * s (gated) or content c
        (importance and select, whose writes compute s from c themselves): [B, T, D]. memory_read=tokens: h is
        the tokens' normed attention input, written as it is."""
        if self.tokens:
            return h
        c = self.compress(self.norm(h))  # [B, T, D]
        if self.mode in ("importance", "select", "delta"):
            return c
        return ops.compress_gate(c, self.importance(c), self.backend)  # c * sigmoid(w_s . c)

    @staticmethod
    def empty(mem: torch.Tensor) -> torch.Tensor:
        """mem: [B, M, D] -> [B, M] bool: the slots no token has filled yet (memory_read=tokens: all zeros)."""
        return (mem == 0).all(dim=-1)

    def important(self, mem: torch.Tensor) -> torch.Tensor:
        """mem: [B, M, D] -> [B, M] bool: the entries with importance w_s . entry > 0 (slot_order=important)."""
        return self.importance(mem).squeeze(-1) > 0

    def write(self, mem: torch.Tensor, g: torch.Tensor, first: bool = False,
              tail: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mem: [B, M, D], g: [B, S, D] (one whole segment) -> updated memory [B, M, D]. `first`: mem is the
        learned initial memory (the select write then prefers any token to it). `tail`: [B, K - 1, D], the
        tokens before g for memory_conv=K (`self.tail`; None: zeros)."""
        if hasattr(self, "conv") and self.mode != "delta":  # each token also carries its predecessors
            g = self._causal_conv(g, tail)
        if self.mode == "importance":
            return self._importance_write(mem, g)
        if self.mode == "select":
            return self._select_write(mem, g, first)
        if self.mode == "delta":
            return self._delta_write(mem, g, tail)
        q = self.query(mem).unsqueeze(1)  # [B, 1, M, D]: one head
        k = self.key(g).unsqueeze(1)  # [B, 1, S, D]
        v = self.value(g).unsqueeze(1)  # [B, 1, S, D]
        new = attention(q, k, v, causal=False, backend="torch").squeeze(1)  # [B, M, D]
        update_logits = self.update(torch.cat([mem, new], dim=-1))  # [B, M, D]
        return ops.memory_update(mem, new, update_logits, self.backend)  # (1 - u) mem + u new

    def tail(self, g: torch.Tensor, tail: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """g: [B, S, D] a written segment's compressed tokens, tail: the one before it -> the K - 1 compressed
        tokens the next segment's convolution sees before its own [B, K - 1, D] (None without memory_conv)."""
        if not hasattr(self, "conv"):
            return None
        before = self.conv.shape[-1] - 1
        if tail is None:
            tail = g.new_zeros(g.shape[0], before, g.shape[2])
        return torch.cat([tail, g], dim=1)[:, g.shape[1]:]  # [B, K - 1, D]: S may be shorter than K - 1

    def _causal_conv(self, x: torch.Tensor, before: Optional[torch.Tensor]) -> torch.Tensor:
        """x: [B, S, D], before: [B, K - 1, D] what precedes it (None: zeros) -> the causal convolution [B, S, D]
        (depthwise, or with memory_conv_mix=full every output channel mixes every input channel of each tap)."""
        return causal_conv(x, self.conv, before)

    def _importance_write(self, mem: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The importance-weighted write (module docstring). Written out rather than through `attention()`
        because it needs the log-sum-exp of the scores with and without the importance bias."""
        scores = self.query(mem) @ self.key(c).transpose(1, 2) / c.shape[-1] ** 0.5  # [B, M, S]
        log_s = F.logsigmoid(self.importance(c).float()).transpose(1, 2)  # [B, 1, S]
        biased = scores.float() + log_s
        strength = (biased.logsumexp(-1, keepdim=True) - scores.float().logsumexp(-1, keepdim=True)).exp()
        new = torch.softmax(biased, dim=-1).type_as(c) @ self.value(c)  # [B, M, D]
        u = strength.type_as(mem) * torch.sigmoid(self.update(torch.cat([mem, new], dim=-1)))  # [B, M, D]
        return mem + u * (new - mem)

    def _select_write(self, mem: torch.Tensor, c: torch.Tensor, first: bool) -> torch.Tensor:
        """Keep the M entries of highest importance among the memory's M and the segment's S tokens, in arrival
        order. Scores are recomputed from the entries (importance(c)), so the state stays [B, M, D]. The kept
        entries are multiplied by 1 + s - s.detach() (= 1): the value is unchanged and importance learns from
        how useful each kept entry was to the losses that read it. The initial memory only fills the slots that the
        first segment's tokens leave free (memory_read=tokens: the empty slots, until tokens fill them). In training
        the ranking carries Gumbel noise (module docstring)."""
        M, D = mem.shape[1], mem.shape[2]
        candidates = torch.cat([mem, c.to(mem.dtype)], dim=1)  # [B, M + S, D]
        logits = self.importance(candidates).squeeze(-1)  # [B, M + S]
        # entries any token beats: the learned initial memory on a first write, the empty slots of memory_read=tokens
        vacant = self.empty(mem) if self.tokens else torch.full(mem.shape[:2], first, device=mem.device)  # [B, M]
        keep = self._keep(candidates, logits, vacant)  # [B, M]
        kept = candidates.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))  # [B, M, D]
        z = logits.float()  # [B, M + S]
        if self.select_grad == "logit":  # the factor's slope does not fade however low the importances sink
            s = self.importance(kept.detach()).float()  # [B, M, 1]: trains w_s, not the entries
        else:
            s = torch.sigmoid(self._relative(z, vacant) if self.importance_relative else z)  # [B, M + S]
            s = s.gather(1, keep).unsqueeze(-1)  # [B, M, 1]
        kept = kept * (1 + (s - s.detach())).to(kept.dtype)  # exactly 1 in value
        if self.training and torch.is_grad_enabled() and (self.importance_penalty > 0 or self.importance_zloss > 0):
            if self.importance_detach > 0:  # withhold that share of their gradient from what the entries hold
                held = candidates - self.importance_detach * (candidates - candidates.detach())  # value: candidates
                z = self.importance(held).squeeze(-1).float()  # [B, M + S]
            zp = self._relative(z, vacant) if self.importance_relative else z
            loss = (self.importance_penalty * torch.sigmoid(zp[:, M:]).mean()  # the segment's tokens
                    + self.importance_zloss * z[:, M:].square().mean())
            kept = _AddLoss.apply(kept, loss)
        return kept

    def _keep(self, candidates: torch.Tensor, logits: torch.Tensor, vacant: torch.Tensor) -> torch.Tensor:
        """candidates [B, M + S, D] (the memory's M entries, then the segment's S tokens), their importances
        logits [B, M + S], vacant [B, M] -> the indices [B, M] of the candidates the select write keeps, in arrival
        order (scripts/memory_contents.py records them)."""
        M = vacant.shape[1]
        rank = logits.detach().float()
        if self.training and self.select_noise > 0:  # Gumbel-top-k: sample M entries without replacement
            scale = self.select_noise * rank.std(dim=1, keepdim=True)  # [B, 1]: relative to the logits' spread
            rank = rank - scale * torch.empty_like(rank).exponential_().log()  # + scale * Gumbel(0, 1)
        rank = torch.cat([rank[:, :M] - 1e4 * vacant, rank[:, M:]], dim=1)
        if self.select_dedup is not None:
            rank = self._suppress_duplicates(candidates, rank)
        return rank.topk(M, dim=1).indices.sort(dim=1).values  # [B, M]

    def _suppress_duplicates(self, candidates: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """candidates [B, N, D], rank [B, N] -> rank with every candidate whose cosine similarity to a higher-ranked
        one exceeds select_dedup moved below all the others, in its order (Fast NMS: a candidate suppressed by one
        that is itself suppressed stays suppressed). Equal ranks: the earlier candidate counts as higher."""
        u = F.normalize(candidates.detach().float(), dim=-1)
        similar = u @ u.transpose(1, 2) > self.select_dedup  # [B, N, N]
        i = torch.arange(rank.shape[1], device=rank.device)
        higher = (rank.unsqueeze(1) > rank.unsqueeze(2)) | ((rank.unsqueeze(1) == rank.unsqueeze(2))
                                                            & (i.unsqueeze(0) < i.unsqueeze(1)))  # [B, i, j]: j above i
        duplicate = (similar & higher).any(dim=2)  # [B, N]
        spread = (rank.amax(dim=1, keepdim=True) - rank.amin(dim=1, keepdim=True) + 1)  # [B, 1]
        return rank - duplicate * spread

    @staticmethod
    def _relative(z: torch.Tensor, vacant: torch.Tensor) -> torch.Tensor:
        """z: [B, M + S] importances of the candidates, vacant: [B, M] the entries any token beats -> z - t
        [B, M + S], t the M-th highest (importance_relative; ranking the vacant entries last), differentiated too."""
        M = vacant.shape[1]
        eligible = torch.cat([z[:, :M] - 1e4 * vacant, z[:, M:]], dim=1)
        return z - z.gather(1, eligible.detach().topk(M, dim=1).indices[:, -1:])

    def _delta_write(self, mem: torch.Tensor, c: torch.Tensor, tail: Optional[torch.Tensor]) -> torch.Tensor:
        """The delta rule over the segment's T tokens in one triangular solve (module docstring), in fp32."""
        T = c.shape[1]
        k = self.key(c)  # [B, T, D]
        if hasattr(self, "conv"):  # memory_conv: a token's key also carries its predecessors' keys
            k = self._causal_conv(k, None if tail is None else self.key(tail))
        k = F.normalize(k.float(), dim=-1)
        v = self.value(c).float()  # [B, T, M]
        b = torch.sigmoid(self.importance(c).float())  # [B, T, 1]
        w = mem.float()  # [B, M, D]
        a = torch.tril(b * (k @ k.transpose(1, 2)), diagonal=-1)  # [B, T, T]: b_t k_t . k_i for i < t
        eye = torch.eye(T, dtype=a.dtype, device=a.device)
        u = torch.linalg.solve_triangular(eye + a, b * (v - k @ w.transpose(1, 2)), upper=False)  # [B, T, M]
        return (w + u.transpose(1, 2) @ k).to(mem.dtype)  # [B, M, D]


class _AddLoss(torch.autograd.Function):
    """Identity on x whose backward also differentiates `loss` (a scalar) as if it were added to the training
    loss: the loss reaches the optimiser wherever x's gradient flows, without being returned through the model."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


class DeltaRead(nn.Module):
    """The read of the delta memory: y = mem normalize(Q h), projected back to the hidden size."""

    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.init_std = cfg.init_std
        self.residual_std = cfg.init_std / (2 * cfg.num_hidden_layers) ** 0.5
        self.query = nn.Linear(cfg.hidden_size, cfg.memory_dim, bias=False)  # Q
        self.out = nn.Linear(cfg.memory_slots, cfg.hidden_size, bias=False)  # O

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.residual_std)

    def forward(self, h: torch.Tensor, mem: torch.Tensor, backend: str = "auto", bias: Optional[torch.Tensor] = None,
                important: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h: [B, T, C] (normed), mem: [B, M, D] -> [B, T, C]. (bias, important: slot options, None here.)"""
        q = F.normalize(self.query(h).float(), dim=-1)  # [B, T, D]
        y = q @ mem.float().transpose(1, 2)  # [B, T, M]
        return self.out(y.to(h.dtype))


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
        # slot_positions: which slot an entry sits in (with select: its arrival order), zero at init; slot_order=
        # important: its place among the important entries, and one more vector shared by the unimportant ones
        places = cfg.memory_slots + (cfg.slot_order == "important")
        self.slot_embedding = nn.Parameter(torch.zeros(places, cfg.memory_dim)) if cfg.slot_positions else None
        self.cross = cfg.memory_read == "cross"
        if self.cross:
            self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
            self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)
        if cfg.read_qk_norm:  # RMSNorm of each head's queries and keys (learned gains): scores sqrt(hd) * cosine
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.kernels)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.kernels)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.kv_proj.weight, std=self.init_std)
        if self.slot_embedding is not None:
            nn.init.zeros_(self.slot_embedding)
        if self.cross:
            nn.init.normal_(self.q_proj.weight, std=self.init_std)
            nn.init.normal_(self.o_proj.weight, std=self.residual_std)
        if hasattr(self, "q_norm"):
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()

    def kv(self, mem: torch.Tensor, important: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mem: [B, M, D], important: [B, M] bool (slot_order=important) or None -> keys, values [B, H, M, hd]."""
        B, M, _ = mem.shape
        if self.slot_embedding is not None:
            places = self.slot_embedding.to(mem.dtype)  # [M, D]: one per slot (arrival order)
            if important is not None:  # [B, M, D]: rank among the important, the rest the shared last vector
                places = places[torch.where(important, important.long().cumsum(1) - 1, M)]
            mem = mem + places  # [B, M, D]
        k, v = self.kv_proj(mem).view(B, M, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, h: torch.Tensor, mem: torch.Tensor, backend: str = "auto",
                bias: Optional[torch.Tensor] = None, important: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h: [B, T, C] (normed), mem: [B, M, D], bias: [B, M] added to every query's score of a slot, or None;
        important: as in `kv` -> [B, T, C]."""
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k, v = self.kv(mem, important)  # [B, H, M, hd]
        if hasattr(self, "q_norm"):  # read_qk_norm
            q, k = self.q_norm(q), self.k_norm(k)
        y = attention(q, k, v, causal=False, backend=backend, key_bias=bias)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

