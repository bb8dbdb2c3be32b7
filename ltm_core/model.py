"""TitanModel: a segment-recurrent transformer with a long-term memory per layer.

The input is read in segments of `segment_length` tokens. Inside a segment, attention is causal; across segments,
information flows only through each layer's memory (ltm_core/memory/: one module per kind). Block:

    x += conv(x)                          short_conv=K: causal depthwise (K - 1 predecessors; across segments with
                                          the memory state: short_conv_carry)
    x += memory.read_before(norm(x))      a residual read before the attention (the neural memory's mal)
    x += SelfAttention(norm(x), prefix)   causal inside the segment; the tokens memory adds its kept tokens as a
                                          prefix, read through the attention's own key/value projections
    x += memory.read(x)                   the slots, delta and neural (mag) memories' residual read
    x += FeedForward(norm(x))             SwiGLU
    memory.write(entries of the segment)  once the segment is complete (from norm(x), the state after attention,
                                          or the block output: the kind's `writes`)

Execution. Inside one BPTT window (`bptt_segments` segments) the model runs layer by layer over all the window's
segments at once (Infini-attention's layer-major order): norms, projections, the short convolution, the FFN and the
segment attention run batched as [B * segments, S, C]; only the memory recurrence steps through the segments
(`Memory.scan`), and the read is one batched attention over (memory + segment). A kind whose write depends on its
own read (`slots`, which writes the block's output; the neural memory's mac, which writes the output of the
attention that read it) cannot take that order and runs segment by segment, as do streaming calls that start or end
inside a segment (generation). `window_parallel = False` on a model forces the segment-by-segment path everywhere:
it is the reference the layer-major pass is tested against. Between windows the state is detached (truncated BPTT).

`use_memory=False` is the same code without the memory: a segment-local transformer (all segments of the input
in one batched call), and a full-causal one when `segment_length >= sequence length`.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

import ltm_core.attention as reads
from ltm_core import ops
from ltm_core.attention import attention, blocked_scores, explicit_read, explicit_read_backward
from ltm_core.config import TitanConfig
from ltm_core.errors import DataError
from ltm_core.layers import (RMSNorm, apply_rotary, causal_conv, constant_tensors, flat_rows, project_chunks,
                             rotary_backward, rotary_positions, rotated_qkv, windowed_conv)
from ltm_core.memory import LayerState, MemoryState, Prefix, Scan, build_memory
from ltm_core.memory.base import AddLoss
from ltm_core.ops import use_cpu_kernels

RECURRENCE = "ltm.memory.recurrence"  # the profiler range of the memory's writes and scans (`ltm bench model`)


def write_counts(segment: int, bptt: int) -> bool:
    """Whether the write ending segment number `segment` (counted from a window start) is read later in its BPTT
    window of `bptt` segments: its auxiliary loss counts (the last write of a window is read only detached)."""
    return segment % bptt < bptt - 1


@functools.lru_cache(maxsize=64)
def window_token_starts(windows: tuple[int, ...], segment: int) -> np.ndarray:
    """[sum(windows) S] int64: the first token of each token's BPTT window, for windows of `windows` segments of S =
    `segment` tokens (read-only; made once per layout)."""
    sizes = np.array(windows, dtype=np.int64) * segment
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    starts.flags.writeable = False
    return starts


@constant_tensors
def counted_writes(first: int, n: int, bptt: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[n] for n writes in a row from segment number `first`: 1 where `write_counts`, else 0."""
    return torch.tensor([float(write_counts(first + i, bptt)) for i in range(n)], device=device, dtype=dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: Optional[tuple[torch.Tensor, torch.Tensor]], prefix: Optional[Prefix], backend: str):
        """h: [B, T, C] -> (out [B, T, C], keys and values of the segment so far [B, H, t + T, hd]). `past`: the
        keys/values of the segment's earlier tokens; `prefix`: tokens every query also reads (no position), through
        this attention's projections."""
        q, k, v = self.project_rotated(h, cos, sin, backend)  # [B, H, T, hd]
        if past is not None:  # tokens already seen in this segment
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        keys, values, prefix_len = k, v, 0
        if prefix is not None:  # the memory's tokens: a non-causal prefix
            pk, pv = self.kv(prefix.tokens)  # [B, H, M, hd]
            keys, values, prefix_len = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), pk.shape[2]
        return self.attend(q, keys, values, prefix_len, prefix, backend), k, v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix_len: int,
               prefix: Optional[Prefix], backend: str) -> torch.Tensor:
        """Queries q [B, H, T, hd] over keys and values [B, H, prefix_len + t, hd] (the prefix first, then the
        segment, causal) -> the output projection [B, T, C]."""
        B, _, T, _ = q.shape
        bias, through = (None, None) if prefix is None else (prefix.bias, prefix.through)
        y = attention(q, keys, values, causal=True, prefix_len=prefix_len, backend=backend, key_bias=bias,
                      key_through=through)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # -1: the local heads under TP

    def read_kept(self, h: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, prefix: Prefix, backend: str) -> torch.Tensor:
        """The layer-major pass's attention: every segment over the tokens kept before it and its own (see
        `project_with_kept`); h: the W segments' tokens flat [B W S, C] -> out [B W S, C]. On CPU in float32, for
        reads the explicit scores take, the kept keys and values and the read are one autograd node (`_KeptRead`)."""
        S, C = cos.shape[0], h.shape[-1]
        _, W, M = rows.shape
        if (use_cpu_kernels(h, backend) and S * (M + S) <= reads.MATH_MAX_SCORES and prefix.bias is not None
                and prefix.through is not None):  # one autograd node, one compiled pass for the gradients
            proj, held = self._project_segments_and_held(h, tokens, W)
            y = _KeptRead.apply(proj, held, rows, cos, sin, prefix.bias, prefix.through, self.heads)  # [B W S, H hd]
            return self.o_proj(y)  # [B W S, C]
        q, keys, values = self.project_with_kept(h.view(-1, S, C), tokens, rows, cos, sin, backend)
        return self.attend(q, keys, values, M, prefix, backend).reshape(-1, C)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [B, T, C] -> queries, keys and values [B, H, T, hd], not rotated."""
        B, T, _ = h.shape
        q, k, v = self.qkv_proj(h).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def project_rotated(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [B, T, C], cos, sin: [T, hd] its positions' -> queries and keys rotated, values [B, H, T, hd]."""
        return rotated_qkv(self.qkv_proj(h), cos, sin, self.heads, backend)

    def kv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, M, C] -> keys and values through this attention's projections [B, H, M, hd], not rotated."""
        _, k, v = self.project(h)
        return k, v

    def project_with_kept(self, h: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The read's inputs for W segments at once: h [B W, S, C] the scanned segments, tokens [B, R, C] the tokens
        held before them (`Scan.row_tokens`, detached), rows [B, W, M] rows of [tokens; the segments' tokens] held
        before each segment -> (queries [B W, H, S, hd] rotated, keys and values [B W, H, M + S, hd]: the kept
        tokens' (no position) then the segment's). The segments' q|k|v projection and the held tokens' k|v one (the
        kept tokens that the segments hold are not projected again; the held ones need no query), assembled by
        `_KeptKeysValues`."""
        proj, held = self._project_segments_and_held(h, tokens, rows.shape[1])
        return _KeptKeysValues.apply(proj, held, rows, cos, sin, self.heads, backend)

    def _project_segments_and_held(self, h: torch.Tensor, tokens: torch.Tensor, segments: int
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B W, S, C] the W = `segments` segments (or their tokens flat, [B W S, C]), tokens [B, R, C] the tokens
        held before them -> (their q|k|v projection [B, W S, 3 H hd] (flat: [B W S, 3 H hd]), the held tokens' k|v one
        [B, R, 2 H hd])."""
        if h.dim() == 3:
            BW, S, C = h.shape
            h = h.reshape(BW // segments, segments * S, C)
        return self.qkv_proj(h), project_chunks(self.qkv_proj, tokens.to(h.dtype), 1, 3)


class _KeptKeysValues(torch.autograd.Function):
    """proj [B, W S, 3 H hd]: the q|k|v projection of W segments of S tokens, held [B, R, 2 H hd]: the k|v projection
    of the R tokens held before them, rows [B, W, M]: the rows of [held; proj] held before each segment, cos, sin:
    [S, hd] -> (q [B W, H, S, hd], keys, values [B W, H, M + S, hd]; contiguous): the segments' queries and keys
    rotated, each segment's kept tokens' keys and values (not rotated) before its own. One autograd node: its
    backward writes the gradients of both projections (the segments' q, k, v, the kept rows' keys and values added),
    where the ops it replaces (a cat of the keys and values to gather from, the gather, rotations, the cats before
    the read) each took a gradient of their own. In float32 on CPU both directions run as one compiled pass each
    (`ltm_core.cpu_kernels`; these ops are its reference)."""

    @staticmethod
    def forward(ctx, proj, held, rows, cos, sin, heads, backend):
        B, W, M = rows.shape
        S, H, R = cos.shape[0], heads, held.shape[1]
        P, hd = R + W * S, proj.shape[2] // (3 * heads)
        flat = flat_rows(rows, P)  # [B W M] rows of the B pools [held; segments]
        ctx.save_for_backward(flat, cos, sin)
        ctx.sizes = (B, W, M, P, S, H, hd, R)
        ctx.compiled = use_cpu_kernels(proj, backend)
        if ctx.compiled:
            from ltm_core import cpu_kernels

            return cpu_kernels.kept_rows_forward(proj, held, flat, cos, sin, W, H, M)
        qkv = proj.view(B, W, S, 3, H, hd)
        q = apply_rotary(qkv[:, :, :, 0].transpose(2, 3), cos, sin).contiguous().view(B * W, H, S, hd)
        keys, values = (proj.new_empty(B, W, H, M + S, hd) for _ in range(2))
        keys[..., M:, :] = apply_rotary(qkv[:, :, :, 1].transpose(2, 3), cos, sin)
        values[..., M:, :] = qkv[:, :, :, 2].transpose(2, 3)
        pool = torch.cat([held.view(B, R, 2, H, hd), qkv.view(B, W * S, 3, H, hd)[:, :, 1:]], 1)  # [B, P, 2, H, hd]
        kept = pool.view(B * P, 2, H, hd).index_select(0, flat).view(B, W, M, 2, H, hd)
        keys[..., :M, :] = kept[..., 0, :, :].transpose(2, 3)
        values[..., :M, :] = kept[..., 1, :, :].transpose(2, 3)
        return q, keys.view(B * W, H, M + S, hd), values.view(B * W, H, M + S, hd)

    @staticmethod
    def backward(ctx, dq, dkeys, dvalues):
        flat, cos, sin = ctx.saved_tensors
        B, W, M, P, S, H, hd, R = ctx.sizes
        if ctx.compiled:
            from ltm_core import cpu_kernels

            dproj, dheld = cpu_kernels.kept_rows_backward(dq, dkeys, dvalues, flat, cos, sin, R, W, B)
            return dproj, dheld, None, None, None, None, None
        dkeys, dvalues = dkeys.view(B, W, H, M + S, hd), dvalues.view(B, W, H, M + S, hd)
        # the keys' and values' gradient first in a buffer of its own [B, P, 2, H, hd]: index_add_ into a contiguous
        # tensor (the kept rows') runs about 6x faster on CPU than into the k|v columns of the q|k|v rows
        dkv = dq.new_empty(B, P, 2, H, hd)
        dkv[:, :R] = 0  # the held tokens' rows: only what the kept rows add
        dseg = dkv[:, R:].view(B, W, S, 2, H, hd)
        dseg[:, :, :, 0] = rotary_backward(dkeys[..., M:, :], cos, sin).transpose(2, 3)
        dseg[:, :, :, 1] = dvalues[..., M:, :].transpose(2, 3)
        dkept = torch.stack([dkeys[..., :M, :].transpose(2, 3), dvalues[..., :M, :].transpose(2, 3)], dim=3)
        dkv.view(B * P, 2, H, hd).index_add_(0, flat, dkept.view(-1, 2, H, hd))  # dkept [B, W, M, 2, H, hd]
        dproj = dq.new_empty(B, W * S, 3, H, hd)
        dproj[:, :, 1:] = dkv[:, R:]
        dproj[:, :, 0].view(B, W, S, H, hd).copy_(rotary_backward(dq.view(B, W, H, S, hd), cos, sin).transpose(2, 3))
        return (dproj.view(B, W * S, 3 * H * hd), dkv[:, :R].reshape(B, R, 2 * H * hd), None, None, None, None,
                None)


class _KeptRead(torch.autograd.Function):
    """`_KeptKeysValues` and the explicit-scores prefix read after it (`ltm_core.attention._ExplicitScores`) in one
    autograd node, on CPU in float32 for reads of at most MATH_MAX_SCORES scores per head: proj, held, rows, cos, sin
    as `_KeptKeysValues`'; bias, through [B W, M] the prefix's score bias and straight-through weight -> the read's
    output [B W, S, H hd], the heads side by side (as the output projection takes them: no transpose, copy and view
    nodes after it). Its backward runs the read's GEMMs, then one compiled pass for the gradients of the projections
    and of the bias and the weight (`cpu_kernels.kept_rows_backward`; the two nodes took two). The two nodes are its
    reference (`model.kernels=torch`), and run for larger reads, in half precision and on GPUs."""

    @staticmethod
    def forward(ctx, proj, held, rows, cos, sin, bias, through, heads):
        from ltm_core import cpu_kernels

        B, W, M = rows.shape
        S, R = cos.shape[0], held.shape[1]
        hd = proj.shape[-1] // (3 * heads)
        flat = flat_rows(rows, R + W * S)  # [B W M] rows of the B pools [held; segments]
        q, keys, values = cpu_kernels.kept_rows_forward(proj, held, flat, cos, sin, W, heads, M)
        blocked = blocked_scores(S, M + S, True, M, None, proj.device, proj.dtype)  # [S, M + S] the mask as scores
        scale = hd ** -0.5
        y, p = explicit_read(q, keys, values, bias, blocked, scale)  # [B W, H, S, hd], [B W, H, S, M + S]
        ctx.save_for_backward(q, keys, values, p, flat, cos, sin)
        ctx.sizes = (B, W, R, scale, proj.shape)
        return y.transpose(1, 2).reshape(B * W * S, heads * hd)  # [B W S, H hd]: one copy

    @staticmethod
    def backward(ctx, dy):
        from ltm_core import cpu_kernels

        q, keys, values, p, flat, cos, sin = ctx.saved_tensors
        B, W, R, scale, proj_shape = ctx.sizes
        dy = dy.reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)  # [B W, H, S, hd]
        dq, dkeys, dvalues, dscores = explicit_read_backward(q, keys, values, p, dy, scale)
        dproj, dheld, dbias, dthrough = cpu_kernels.kept_rows_backward(dq, dkeys, dvalues, flat, cos, sin, R, W, B,
                                                                      read=(dscores, keys, values), proj=proj_shape)
        want_bias, want_through = ctx.needs_input_grad[5:7]
        return (dproj, dheld, None, None, None, dbias if want_bias else None, dthrough if want_through else None,
                None)


class FeedForward(nn.Module):
    """SwiGLU: W2 (silu(W1 x) * W3 x)."""

    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.backend = cfg.kernels
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_up_proj(h), self.backend))


class Block(nn.Module):
    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.attn = SelfAttention(cfg)
        if cfg.short_conv:  # [C, K] one weight per channel and tap
            self.short_conv = nn.Parameter(torch.empty(cfg.hidden_size, cfg.short_conv))
        self.memory = build_memory(cfg) if cfg.use_memory else None
        self.carry = cfg.use_memory and cfg.short_conv_carry  # the convolution crosses segments with the memory
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.ffn = FeedForward(cfg)

    def reset_parameters(self) -> None:
        std, residual_std = self.cfg.init_std, self.cfg.init_std / (2 * self.cfg.num_hidden_layers) ** 0.5
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        nn.init.normal_(self.attn.qkv_proj.weight, std=std)
        nn.init.normal_(self.attn.o_proj.weight, std=residual_std)
        if self.cfg.short_conv:  # the block starts as it would be without it
            nn.init.zeros_(self.short_conv)
        nn.init.normal_(self.ffn.gate_up_proj.weight, std=std)
        nn.init.normal_(self.ffn.down_proj.weight, std=residual_std)
        if self.memory is not None:
            self.memory.reset_parameters()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerState):
        """Tokens of one segment, in order (the segment-by-segment path). x: [B, T, C] -> (x, keys, values
        [B, H, t + T, hd], the tokens' write entries [B, T, D] or None, the block inputs of the segment's last
        K - 1 tokens [B, K - 1, C] or None)."""
        x, shift = self._short_conv(x, past.shift)
        normed = self.attn_norm(x)  # [B, T, C]
        mem, state = self.memory, past.memory
        written = {"normed": normed}  # the hidden states a kind may write (else the block output)
        x, h = self._read_before(x, normed, state)
        prefix = mem.prefix(state) if mem is not None else None
        kv = None if past.keys is None else (past.keys, past.values)
        a, k, v = self.attn(h, cos, sin, kv, prefix, self.cfg.kernels)
        x = x + a
        written["attended"] = x
        if mem is not None:
            read = mem.read(x, state)
            if read is not None:
                x = x + read
        x = x + self.ffn(self.ffn_norm(x))
        entries = None if mem is None else mem.entries(written.get(mem.writes, x))
        return x, k, v, entries, shift

    def forward_window(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerState,
                       noise: Optional[torch.Tensor], windows: tuple[int, ...]
                       ) -> tuple[torch.Tensor, Optional[Scan], Optional[torch.Tensor]]:
        """W complete segments at once (the layer-major path; the memory must write "normed" or "attended"), in
        BPTT windows of `windows` segments each (sum W; gradients stop at each boundary: the state that crosses it
        is detached). x: [B, W, S, C], past: the state before the first, noise: [W, ...] the writes' training noise
        or None -> (x [B, W, S, C], the memory's scan over the segments or None, the block inputs of the last K - 1
        tokens [B, K - 1, C] when they are carried, else None)."""
        B, W, S, C = x.shape
        x, shift = self._short_conv_window(x, past.shift, windows)
        # the tokens flat, [B W S, C]: the token-wise ops (norms, projections, FFN, residuals) take 2-D tensors, with no
        # view (an operator and an autograd node each) inside every projection; segments [B W, S, C] and windows [B,
        # W, S, C] are views where a memory or the attention needs them
        h = x.reshape(-1, C)
        segments = (B * W, S, C)
        normed = self.attn_norm(h)
        mem, scan = self.memory, None
        if mem is not None and mem.writes == "normed":  # every segment's memory is known before the attention
            with record_function(RECURRENCE):
                scan = mem.scan_windows(past.memory, mem.entries(normed.view(B, W, S, C)), noise, windows)
        if scan is not None:
            h, normed = self._read_before(h, normed, scan.before, segments)
        prefix = mem.scan_prefix(scan) if scan is not None else None
        if prefix is not None and scan.rows is not None:  # kept tokens: gather their keys/values, do not project them
            a = self.attn.read_kept(normed, scan.row_tokens, scan.rows, cos, sin, prefix, self.cfg.kernels)
        else:
            a = self.attn(normed.view(segments), cos, sin, None, prefix, self.cfg.kernels)[0].reshape(-1, C)
        h = h + a
        if mem is not None and mem.writes == "attended":
            with record_function(RECURRENCE):
                scan = mem.scan_windows(past.memory, mem.entries(h.view(B, W, S, C)), noise, windows)
        if scan is not None:
            read = mem.read(h.view(segments), scan.before)
            if read is not None:
                h = h + read.reshape(-1, C)
        h = h + self.ffn(self.ffn_norm(h))
        return h.view(B, W, S, C), scan, shift

    def _read_before(self, x: torch.Tensor, normed: torch.Tensor, state, segments: Optional[tuple] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's read before the attention, if it has one: x [B, T, C] (or its tokens flat, [B T, C], with
        `segments` the shape the memory reads them in), its norm -> (x + the read, the attention's input norm(x +
        read)); else (x, normed) unchanged."""
        if self.memory is None:
            return x, normed
        read = self.memory.read_before(normed if segments is None else normed.view(segments), state)
        if read is None:
            return x, normed
        x = x + read.reshape(x.shape)
        return x, self.attn_norm(x)

    def _short_conv(self, x: torch.Tensor, before: Optional[torch.Tensor], carried: bool = True):
        """x: [B, T, C], before: [B, K - 1, C] the inputs before it in the segment, or carried from the previous
        one (None: zeros) -> (x + the causal depthwise convolution of x, the inputs of the last K - 1 tokens, or
        None when not `carried`)."""
        if not self.cfg.short_conv:
            return x, None
        T = x.shape[1]
        if before is None:
            before = x.new_zeros(x.shape[0], self.short_conv.shape[1] - 1, x.shape[2])
        y = causal_conv(x, self.short_conv, before, self.cfg.kernels, residual=True)  # [B, T, C]: x + the convolution
        if not carried:
            return y, None
        K1 = before.shape[1]  # the inputs of the last K - 1 tokens, a copy (T may be shorter than K - 1)
        tail = torch.cat([before.to(x.dtype), x[:, max(T - K1, 0):]], dim=1)  # [B, <= 2 (K - 1), C]
        return y, tail[:, tail.shape[1] - K1:]

    def _short_conv_window(self, x: torch.Tensor, before: Optional[torch.Tensor], windows: tuple[int, ...]):
        """x: [B, W, S, C] -> (x + the convolution: over each BPTT window from the inputs before it when they are
        carried (`before` for the first window, the previous window's last K - 1 inputs, detached, for the others),
        else restarting at every segment; the carried inputs of the last K - 1 tokens, or None)."""
        if not self.cfg.short_conv:
            return x, None
        B, W, S, C = x.shape
        if not self.carry:
            y, _ = self._short_conv(x.flatten(0, 1), None, carried=False)
            return y.view(B, W, S, C), None
        # the previous window's last inputs reach each window's first tokens without a gradient path back; on CPU in
        # float32 one compiled pass over the whole pass's tokens that cuts those paths in backward, else equal
        # windows run as one batch [B G, n S, C], others one by one (the reference)
        K1 = self.short_conv.shape[1] - 1
        if before is None:
            before = x.new_zeros(B, K1, C)
        if use_cpu_kernels(x, self.cfg.kernels) and self.short_conv.dtype == before.dtype == torch.float32:
            y = windowed_conv(x, self.short_conv, before, window_token_starts(windows, S))  # [B, W, S, C]
            # the carried inputs, a copy (x may be a buffer its caller reuses: a pipeline stage's), those before the
            # last window detached (as the reference carries them)
            tokens, last = x.flatten(1, 2), (W - windows[-1]) * S  # [B, W S, C], the last window's first token
            if W * S - K1 >= last:
                return y, tokens[:, -K1:].clone()
            earlier = torch.cat([before, tokens[:, :last]], 1)[:, -(K1 - (W * S - last)):]  # the rest, before it
            return y, torch.cat([earlier.detach() if last else earlier, tokens[:, last:]], 1)
        if len(set(windows)) == 1 and windows[0] * S >= K1:
            G, T = len(windows), windows[0] * S
            xw = x.view(B, G, T, C)
            befores = torch.cat([before.unsqueeze(1).to(x.dtype), xw[:, :-1, T - K1:].detach()], dim=1)  # [B, G, K1, C]
            y, _ = self._short_conv(xw.flatten(0, 1), befores.flatten(0, 1), carried=False)  # [B G, T, C]
            # the carried inputs are a copy: x may be a buffer its caller reuses (a pipeline stage's receive buffer)
            return y.view(B, W, S, C), xw[:, -1, T - K1:].clone()
        out, start, shift = [], 0, before
        for i, n in enumerate(windows):
            if i:
                shift = shift.detach()
            y, shift = self._short_conv(x[:, start:start + n].flatten(1, 2), shift)
            out.append(y.view(B, n, S, C))
            start += n
        return torch.cat(out, dim=1), shift


@dataclass
class TitanOutput:
    logits: torch.Tensor  # [B, L, vocab]
    memory: MemoryState  # state after the last token, to continue from
    loss: Optional[torch.Tensor] = None  # mean cross-entropy over labels != -100, when labels are given
    aux_loss: Optional[torch.Tensor] = None  # the memory writes' auxiliary training losses (already in the
    # gradient through the writes; reported for logging), summed over the writes a later read of their window uses


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs



class SegmentRecurrence(nn.Module):
    """Runs `self.blocks` over a long input from a `MemoryState`: the layer-major window pass where it can, the
    segment-by-segment path elsewhere. Shared by TitanModel and the pipeline stages (which hold some blocks)."""

    window_parallel: bool = True  # False: segment by segment everywhere (the reference of the layer-major pass)
    aux_weight: float = 1.0  # the weight of the writes' auxiliary losses in the gradient: the trainers set it to
    # the share of the batch one forward holds (1 / gradient accumulation, / pipeline microbatches), as they
    # scale the token loss

    def register_write_hook(self, hook: Callable) -> RemovableHandle:
        """Call `hook(layer, entries, kept)` after every memory write: the layer's index, what the segment wrote
        [B, S, D] and, for kinds that select (tokens), the candidates kept [B, M] (indices into the memory's M
        entries before the write, then the segment's S tokens; `Write.kept`). Each layer's writes arrive in order.
        Returns a handle whose `remove()` unregisters it (diagnostics: scripts/memory_contents.py)."""
        hooks = self.__dict__.setdefault("_write_hooks", OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def _call_write_hooks(self, layer: int, entries: torch.Tensor, kept: Optional[torch.Tensor]) -> None:
        for hook in self.__dict__.get("_write_hooks", {}).values():
            hook(layer, entries, kept)

    def initial_state(self, batch_size: int) -> MemoryState:
        layers = [LayerState(block.memory.initial_state(batch_size) if block.memory is not None else None)
                  for block in self.blocks]
        return MemoryState(layers, batch_size=batch_size)

    def run_blocks(self, x: torch.Tensor, state: MemoryState):
        """x: [B, L, C] -> (hidden states [B, L, C], the state after the last token, aux loss or None)."""
        cfg = self.config
        S, L = cfg.segment_length, x.shape[1]
        memory = next(iter(self.blocks)).memory
        layer_major = self.window_parallel and (memory is None or memory.window_parallel)
        chunks, aux, pos = [], [], 0
        while pos < L:
            whole = (L - pos) // S if state.offset == 0 else 0  # complete segments from here
            if layer_major and whole:
                # the rest of the current BPTT window, and up to windows_per_pass - 1 more
                n = whole if memory is None else min(whole, cfg.bptt_segments * cfg.windows_per_pass
                                                     - state.segments % cfg.bptt_segments)
                h, state = self._window(x[:, pos:pos + n * S], state, n, aux)
            else:
                h, state = self._step(x[:, pos:pos + min(S - state.offset, L - pos)], state, aux)
            chunks.append(h)
            pos += h.shape[1]
        h = x if not chunks else chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)  # one pass: no copy
        aux = [a for a in aux if a is not None]
        return h, state, (None if not aux else aux[0] if len(aux) == 1 else torch.stack(aux).sum())

    def _noise(self, state: MemoryState, batch_size: int, device: torch.device) -> Optional[torch.Tensor]:
        """The current window's training noise for every write [bptt_segments, layers, ...] (None if the memory draws
        none): drawn once, at the window's first write, so the layer-major and the segment-by-segment paths read
        the same numbers."""
        if state.noise is None or state.segments % self.config.bptt_segments == 0:
            return self._draw_noise(batch_size, device)
        return state.noise

    def _draw_noise(self, batch_size: int, device: torch.device, windows: int = 0) -> Optional[torch.Tensor]:
        """A fresh window's noise [bptt_segments, layers, ...], or with `windows` > 0 as many windows' [windows,
        bptt_segments, layers, ...], each drawn in turn into one buffer (the same numbers as one draw per window);
        None (no noise: not training, or a kind without)."""
        memory = next(iter(self.blocks)).memory
        shape = None if memory is None or not self.training else memory.noise_shape(batch_size,
                                                                                  self.config.segment_length)
        if shape is None:
            return None
        noise = torch.empty(max(windows, 1), self.config.bptt_segments, len(self.blocks), *shape, device=device)
        for window in noise:
            window.exponential_()
        return noise if windows else noise[0]

    def _advance(self, state: MemoryState, layers: list, complete: int, offset: int, noise) -> MemoryState:
        """The state after `complete` more segments (and `offset` tokens into the next); detached at a window end."""
        segments = state.segments + complete
        window_end = complete and segments % self.config.bptt_segments == 0
        new = MemoryState(layers, offset, segments, state.batch_size, None if window_end else noise)
        return new.detach() if window_end else new  # truncated BPTT: gradients stop at window boundaries

    def _window(self, x: torch.Tensor, state: MemoryState, n: int, aux: list):
        """n complete segments x: [B, n S, C], the rest of the current BPTT window and possibly more windows,
        layer by layer."""
        cfg = self.config
        B, S, bptt = x.shape[0], cfg.segment_length, cfg.bptt_segments
        cos, sin = rotary_positions(S, cfg.head_dim, cfg.rope_theta, x.device)
        p = state.segments % bptt
        windows = [min(n, bptt - p)]  # segments of each BPTT window in this pass
        while sum(windows) < n:
            windows.append(min(bptt, n - sum(windows)))
        if p == 0:  # every window of the pass starts here: their noise drawn in turn, into one buffer
            noise = self._draw_noise(B, x.device, len(windows))  # [G, bptt, layers, ...]
            window_noise = None if noise is None else noise.flatten(0, 1)[:n]  # [n, layers, ...]
            noise = None if noise is None else noise[-1]
        else:  # the current window's noise goes on; each later window draws its own, in order, as the sequential
            noise = self._noise(state, B, x.device)  # path does
            parts = None if noise is None else [noise[p:p + windows[0]]]
            for size in windows[1:]:
                noise = self._draw_noise(B, x.device)
                if parts is not None:
                    parts.append(noise[:size])
            window_noise = None if parts is None else torch.cat(parts)  # [n, layers, ...]
        run = self._compiled_window if self._compiled_window is not None else self._window_layers
        h, layers, scans = run(x.view(B, n, S, -1), cos, sin, tuple(state.layers), window_noise, tuple(windows))
        if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES:
            # a CUDA-graph replay overwrites the outputs of the previous one: the state and the window's output
            # outlive the call, so they are copied out of the graph's memory pool
            h, layers = h.clone(), tuple(ls.map(torch.clone) for ls in layers)
        hooked = bool(self.__dict__.get("_write_hooks"))
        for l, scan in enumerate(scans):
            for i in range(n if hooked and scan is not None else 0):
                self._call_write_hooks(l, scan.entries[:, i], None if scan.kept is None else scan.kept[:, i])
        losses = [scan.aux for scan in scans if scan is not None and scan.aux is not None]  # [n] each layer's writes'
        counted = []
        if losses:  # those a later read in their window uses, every layer's in one sum
            writes = counted_writes(state.segments % cfg.bptt_segments, n, cfg.bptt_segments, losses[0].device,
                                    losses[0].dtype)  # [n]
            counted.append(torch.mv(torch.stack(losses), writes).sum())
        return self._add_aux(h.flatten(1, 2), counted, aux), self._advance(state, list(layers), n, 0, noise)

    def _add_aux(self, h: torch.Tensor, counted: list, aux: list) -> torch.Tensor:
        """The counted writes' auxiliary losses join the gradient (times `aux_weight`) through the hidden states h,
        which every backward of their window passes through; they are also collected in `aux` for logging."""
        if not counted:
            return h
        total = counted[0] if len(counted) == 1 else torch.stack(counted).sum()
        aux.append(total)
        return AddLoss.apply(h, total, self.aux_weight) if torch.is_grad_enabled() else h

    def _window_layers(self, x: torch.Tensor, cos, sin, pasts: tuple, noise: Optional[torch.Tensor],
                       windows: tuple[int, ...]):
        """x: [B, n, S, C] through every block, in BPTT windows of `windows` segments (the unit `model.compile`
        compiles) -> (x, the layers' states after the last segment, each layer's memory scan or None)."""
        layers, scans = [], []
        for l, block in enumerate(self.blocks):
            past = pasts[l]
            layer_noise = None if noise is None else noise[:, l]
            if self.config.activation_checkpointing and self.training:
                x, scan, shift = checkpoint(block.forward_window, x, cos, sin, past, layer_noise, windows,
                                            use_reentrant=False)
            else:
                x, scan, shift = block.forward_window(x, cos, sin, past, layer_noise, windows)
            layers.append(LayerState(None if scan is None else scan.after, shift=shift))
            scans.append(scan)
        return x, tuple(layers), scans

    def _step(self, x: torch.Tensor, state: MemoryState, aux: list):
        """t tokens that all fall in the current segment, segment by segment. x: [B, t, C]."""
        cfg = self.config
        offset = state.offset
        complete = offset + x.shape[1] == cfg.segment_length
        cos, sin = (t[offset:offset + x.shape[1]]  # the positions inside the segment
                    for t in rotary_positions(cfg.segment_length, cfg.head_dim, cfg.rope_theta, x.device))
        noise = self._noise(state, x.shape[0], x.device) if complete else state.noise
        p = state.segments % cfg.bptt_segments
        layers, counted = [], []
        for l, (block, past) in enumerate(zip(self.blocks, state.layers)):
            if cfg.activation_checkpointing and self.training:
                x, k, v, entries, shift = checkpoint(block, x, cos, sin, past, use_reentrant=False)
            else:
                x, k, v, entries, shift = block(x, cos, sin, past)
            if entries is not None and past.pending is not None:
                entries = torch.cat([past.pending, entries], dim=1)  # [B, offset + t, D]
            if not complete:
                layers.append(LayerState(past.memory, k, v, entries, shift))
            elif block.memory is not None:  # the segment is complete: write it
                with record_function(RECURRENCE):
                    write = block.memory.write(past.memory, entries, None if noise is None else noise[p, l])
                self._call_write_hooks(l, entries, write.kept)
                if write.aux is not None and write_counts(state.segments, cfg.bptt_segments):
                    counted.append(write.aux)
                layers.append(LayerState(write.state, shift=shift if block.carry else None))
            else:  # the next segment's convolution starts from zeros, as its attention from nothing
                layers.append(LayerState(None))
        return (self._add_aux(x, counted, aux),
                self._advance(state, layers, int(complete), 0 if complete else offset + x.shape[1], noise))


class InputIdsError(DataError, ValueError):
    """Token ids a model cannot read: not a 2-D integer tensor, or ids outside the vocabulary (a DataError: one line;
    also a ValueError, which `InferenceEngine` raised for a bad prompt shape before)."""


def check_input_ids(input_ids, vocab_size: int, name: str = "input_ids", ids_range: bool = True) -> None:
    """`TitanModel.forward`'s and `InferenceEngine`'s entry check: a 2-D [batch, tokens] int64 / int32 tensor and,
    with `ids_range`, every id in [0, vocab_size) (one min/max pass: on a GPU tensor it waits for the device)."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputIdsError(f"data error: {name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputIdsError(f"data error: {name} must hold integer token ids (torch.long), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        hint = "; for one sequence pass ids.unsqueeze(0)" if input_ids.dim() == 1 else ""
        raise InputIdsError(f"data error: {name} must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}"
                            f"{hint}")
    if ids_range and input_ids.numel():
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            raise InputIdsError(f"data error: {name} holds token ids outside the vocabulary [0, {vocab_size}): "
                                f"min {low}, max {high}")


class TitanModel(SegmentRecurrence):
    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._compiled_window = compile_window(self)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ----------------------------------------------------------------------------------------- construction
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after `to_empty()` when the model was built on the meta device."""
        self.tie_weights()
        nn.init.normal_(self.embed_tokens.weight, std=self.config.init_std)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)
        self.norm.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if exclude_embeddings and not self.config.tie_word_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the nanoGPT/torchtitan way: 6N (dense parameters,
        embedding lookup excluded) + 12 L C T (attention over T = min(segment, seq_len) keys) + what each layer's
        memory adds (`Memory.flops_per_token`: e.g. the tokens memory's read over M more keys)."""
        cfg = self.config
        n = self.num_parameters() - (self.embed_tokens.weight.numel() if not cfg.tie_word_embeddings else 0)
        T = min(cfg.segment_length, seq_len)
        flops = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * T
        if cfg.use_memory:
            flops += cfg.num_hidden_layers * self.blocks[0].memory.flops_per_token(T)
        return float(flops)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, memory: Optional[MemoryState] = None,
                labels: Optional[torch.Tensor] = None) -> TitanOutput:
        """input_ids: [B, L] -> logits [B, L, vocab]; continues from `memory` (the previous call's state). Ids that
        are not a 2-D integer tensor, or (on CPU) outside the vocabulary, are a one-line `InputIdsError`."""
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.compiler.is_exporting()):
            # not while torch.compile / ONNX export / tracing run this code. The id range only on CPU: about 5 us a
            # call there (0.01 % of a model=tiny training step at 8K); on a GPU it would wait for the device, and a
            # GPU's ids come from checked data or `InferenceEngine`, which checks them
            check_input_ids(input_ids, self.config.vocab_size, ids_range=input_ids.device.type == "cpu")
        state = memory if memory is not None else self.initial_state(input_ids.shape[0])
        x = self.embed_tokens(input_ids)  # [B, L, C]
        h, state, aux = self.run_blocks(x, state)
        logits = self.lm_head(self.norm(h))  # [B, L, vocab]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return TitanOutput(logits=logits, memory=state, loss=loss, aux_loss=aux)


def compile_window(module: nn.Module) -> Optional[Callable]:
    """`model.compile`: the layer-major window step (every block and the memory recurrence) through torch.compile,
    in `model.compile_mode`; None when compilation is off."""
    cfg = module.config
    return torch.compile(module._window_layers, mode=cfg.compile_mode) if cfg.compile else None
