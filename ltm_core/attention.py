"""The one attention dispatch.

Every attention in the model (segment self-attention, memory-as-context, memory read) calls `attention()`.
The default backend is PyTorch's `scaled_dot_product_attention`; the Triton flash kernel from
`ltm_extensions` plugs in here (`backend="triton"`, or `"auto"` on CUDA when Triton is importable, for the masks where
it measured faster than SDPA: `AUTO_CHOICE`).

Key layout: the first `prefix_len` keys (memory slots) are visible to every query; the remaining
`Lk - prefix_len` keys are the segment, whose last `Lq` positions the queries are (bottom-right alignment,
so a KV cache with Lq < Lk works). `causal` applies to the segment part; `window=w` lets a query at segment
position p see segment keys in (p - w, p]. `key_bias` [B, Lb] adds a score to each of the first Lb keys (the
memory slots), for every query and head: the Triton kernel adds it to the prefix keys' scores itself; for SDPA it
is folded into one extra head dimension (`with_key_bias`: SDPA's fused kernels give no gradient to a score bias;
on CPU, outside torch.compile, a prefix read of at most MATH_MAX_SCORES scores per head writes its scores out and
adds it to them instead, in one autograd node: `_ExplicitScores`). `key_through` [B, Lb] is a
straight-through weight s of the same keys: their keys and values are used unchanged, and s gets the gradient that
a factor (1 + s - s.detach()) = 1 on them would get (how the tokens memory's importance learns from the reads),
without another copy of the keys and values saved for backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ltm_core.layers import constant_tensors
from ltm_core.ops import use_cpu_kernels, use_kernels
from ltm_extensions.reference import attention_mask, with_key_bias  # the one statement of the mask rule, and
# of the key bias's fold

__all__ = ["attention", "attention_mask", "with_key_bias"]

BACKENDS = ("auto", "triton", "torch")
# On CPU a prefix read with at most this many scores per (batch, head) writes its scores out (`_ExplicitScores`):
# model=tiny's 64 queries x (64 kept + 64 segment keys) takes 0.963x the training step of SDPA's fused kernel with
# the key bias folded into a head dimension; model=small's 256 x 512, with the key bias's and weight's gradients
# compiled (`_prefix_grads`), 0.965-0.98x, at 23 MiB more peak memory (scripts/bench_prefix_read.py,
# docs/benchmarks.md): the largest read measured. Not under torch.compile (`model.compile`), where Inductor lowered
# its batched matmuls one batch element at a time: tiny's compiled 8K step took 0.38-0.39 s with it, 0.25-0.26 s
# with SDPA's kernel (docs/benchmarks.md).
MATH_MAX_SCORES = 256 * 512
# `auto` on CUDA, per mask, the implementation that `ltm bench kernels` measured fastest (forward + backward, bf16,
# H200, 2026-11-30, benchmarks/results/gpu_kernels_bf16.json; the table in docs/benchmarks.md):
AUTO_CHOICE = {
    "plain": "sdpa",     # no prefix, no window, causal over Lq = Lk or full: SDPA's flash kernel, 0.61-0.64x the
                         # Triton kernel's time at 4K-16K causal, 0.21x at 512 x 64 full
    "prefix": "triton",  # memory prefix: 0.54x SDPA's (masked) time at 4,096 queries; at 512 queries SDPA took 0.74x
                         # Triton's without a key bias; the model's read with its key bias (the kernel adds it at
                         # head dim 64, SDPA needs it folded into a 65th: `ltm bench kernels`' key_bias case) not
                         # measured yet
    "window": "triton",  # sliding window: 0.14x SDPA's (masked) time
    "cached": "triton",  # causal over the last Lq < Lk keys (a KV cache): not measured, the kernel kept
}


def mask_kind(lq: int, lk: int, causal: bool, prefix_len: int, window: Optional[int]) -> str:
    """The AUTO_CHOICE row of an attention's mask."""
    if window is not None:
        return "window"
    if prefix_len:
        return "prefix"
    return "plain" if lq == lk or not causal else "cached"


class _StraightThrough(torch.autograd.Function):
    """(k, v [B, H, L, d'], s [B, Lb], d) -> k, v unchanged; s's gradient: that of a factor on the first d dims of
    the first Lb keys and values, sum_{h, j < d} (dk k + dv v). Saves k and v, which the attention saves anyway."""

    @staticmethod
    def forward(ctx, k, v, s, d):
        ctx.save_for_backward(k, v)
        ctx.Lb, ctx.d, ctx.s_dtype = s.shape[1], d, s.dtype
        return k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dk, dv):
        k, v = ctx.saved_tensors
        ds = _factor_grad(((dk, k), (dv, v)), ctx.Lb, ctx.d, torch.float32) if ctx.needs_input_grad[2] else None
        return dk, dv, None if ds is None else ds.to(ctx.s_dtype), None


def _factor_grad(pairs, lb: int, d: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The gradient of a factor s on the first d dims of the first lb keys and values: pairs ((dk, k), (dv, v)) of
    [B, H, L, d'] (a gradient may be None) -> sum_{h, j < d} (dk k + dv v) [B, lb] in `dtype`, or None."""
    terms = [torch.linalg.vecdot(g[:, :, :lb, :d].to(dtype), t[:, :, :lb, :d].to(dtype)) for g, t in pairs
             if g is not None]  # [B, H, lb] each: a dot product per key and head, no [B, H, lb, d] product
    return sum(terms).sum(dim=1) if terms else None


def _straight_through(k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, d: int):
    """k, v: [B, H, Lk, d'], s: [B, Lb] -> k, v (the same values); under autograd s gets the gradient of a factor
    (1 + s - s.detach()) on the first d dims of the first Lb keys and values."""
    if not (torch.is_grad_enabled() and s.requires_grad):
        return k, v
    return _StraightThrough.apply(k, v, s, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, prefix_len: int = 0,
              window: Optional[int] = None, scale: Optional[float] = None, backend: str = "auto",
              key_bias: Optional[torch.Tensor] = None, key_through: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention. q: [B, H, Lq, d]; k, v: [B, H, Lk, d]; key_bias, key_through: [B, Lb] or None ->
    [B, H, Lq, d]."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    hd, lq, lk = q.shape[-1], q.shape[-2], k.shape[-2]
    if causal and lq > lk - prefix_len:
        raise ValueError(f"{lq} queries need at least as many segment keys, got {lk - prefix_len}")
    if (prefix_len and q.device.type == "cpu" and not use_kernels(backend, q) and lq * lk <= MATH_MAX_SCORES
            and not torch.compiler.is_compiling()):
        blocked = blocked_scores(lq, lk, causal, prefix_len, window, q.device, torch.promote_types(q.dtype,
                                                                                                  torch.float32))
        return _ExplicitScores.apply(q, k, v, key_bias, key_through, blocked,
                                     q.shape[-1] ** -0.5 if scale is None else scale, use_cpu_kernels(q, backend))
    if key_through is not None:
        k, v = _straight_through(k, v, key_through, hd)
    kind = mask_kind(lq, lk, causal, prefix_len, window)
    triton = use_kernels(backend, q) and (backend == "triton" or AUTO_CHOICE[kind] == "triton")
    if key_bias is not None and not (triton and key_bias.shape[1] == prefix_len):
        q, k, v = with_key_bias(q, k, v, key_bias)  # head dim hd + 1
        y = attention(q, k, v, causal=causal, prefix_len=prefix_len, window=window,
                      scale=hd ** -0.5 if scale is None else scale, backend=backend)
        return y[..., :hd]  # [B, H, Lq, d]
    if triton:  # the kernel adds a key bias on the prefix keys itself, at the head dim as it is
        from ltm_extensions import flash_attention

        return flash_attention(q, k, v, causal=causal, prefix_len=prefix_len, window=window, scale=scale,
                               backend="triton" if backend == "triton" else "auto", key_bias=key_bias)
    if kind == "plain":  # SDPA's fused kernels (flash / memory-efficient) apply
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and lq > 1, scale=scale)
    mask = _visible(lq, lk, causal, prefix_len, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@constant_tensors
def _visible(lq: int, lk: int, causal: bool, prefix_len: int, window: Optional[int],
             device: torch.device) -> torch.Tensor:
    """`attention_mask`, made once per arguments."""
    return attention_mask(lq, lk, causal=causal, prefix_len=prefix_len, window=window, device=device)


@constant_tensors
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim zero, made once (the input a GEMM with beta=0 ignores)."""
    return torch.zeros((), dtype=dtype, device=device)


@constant_tensors
def blocked_scores(lq: int, lk: int, causal: bool, prefix_len: int, window: Optional[int], device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """The mask as scores to add: [lq, lk] of 0 where a query sees a key, -inf where not (`dtype`), made once."""
    visible = _visible(lq, lk, causal, prefix_len, window, device)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


class _ExplicitScores(torch.autograd.Function):
    """softmax(q k^T * scale + mask + key bias) v with the scores [B, H, Lq, Lk] written out and kept for backward, in
    one autograd node: the CPU path of a prefix read up to MATH_MAX_SCORES scores per head (there faster than SDPA's
    fused kernel with the key bias folded into a head dimension). The key bias's gradient is the scores' summed over
    heads and queries, the straight-through weight's that of a factor on the first Lb keys and values (as
    `_straight_through`). The prefix keys are visible to every query, so no row is fully masked.

    q: [B, H, Lq, d]; k, v: [B, H, Lk, d]; bias, through: [B, Lb] or None; blocked: [Lq, Lk] the mask as scores
    (0 or -inf, in the scores' dtype: fp32 for half inputs); compiled: whether `_prefix_grads` runs compiled
    (`use_cpu_kernels`) -> [B, H, Lq, d]."""

    @staticmethod
    def forward(ctx, q, k, v, bias, through, blocked, scale, compiled):
        y, p = explicit_read(q, k, v, bias, blocked, scale)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale, ctx.lb = scale, next((t.shape[1] for t in (bias, through) if t is not None), None)
        ctx.dtypes = (None if bias is None else bias.dtype, None if through is None else through.dtype)
        ctx.compiled = compiled  # the key bias's and the weight's gradients as one compiled pass (`_prefix_grads`)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, p = ctx.saved_tensors
        dq, dk, dv, dscores = explicit_read_backward(q, k, v, p, dy, ctx.scale)
        dbias, dthrough = _prefix_grads(ctx, dscores, dk, k, dv, v)
        return dq, dk, dv, dbias, dthrough, None, None, None


def explicit_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                  blocked: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_ExplicitScores`' forward arithmetic (also `ltm_core.model._KeptRead`'s): q [B, H, Lq, d], k, v [B, H, Lk,
    d], bias [B, Lb] or None, blocked [Lq, Lk] the mask as scores -> (the output [B, H, Lq, d], the probabilities
    [B, H, Lq, Lk] in blocked's dtype, for backward)."""
    dtype = blocked.dtype
    B, H, Lq, d = q.shape
    # [B, H, Lq, Lk]: the scale and the mask inside the batched GEMM (no scaled copy of the queries)
    scores = torch.baddbmm(blocked.to(q.dtype), q.reshape(B * H, Lq, d), k.reshape(B * H, -1, d).transpose(1, 2),
                           alpha=scale).view(B, H, Lq, -1).to(dtype)
    if bias is not None:  # on the first Lb keys, in place: no [B, 1, Lq, Lk] sum of the mask and the bias
        scores[..., :bias.shape[1]].add_(bias.to(dtype)[:, None, None, :])
    p = torch.softmax(scores, dim=-1)
    return torch.matmul(p.to(v.dtype), v), p


def explicit_read_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, dy: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`explicit_read`'s backward from its output's gradient dy -> (dq, dk, dv, the scores' gradient [B, H, Lq, Lk]
    in p's dtype)."""
    dy = dy.contiguous()  # once: the output projection's gradient arrives [B, Lq, H, d]-ordered, and each GEMM
    # below would copy it
    dv = torch.matmul(p.to(dy.dtype).transpose(-1, -2), dy)  # [B, H, Lk, d]
    dscores = torch._softmax_backward_data(torch.matmul(dy, v.transpose(-1, -2)).to(p.dtype), p, -1, p.dtype)
    B, H, Lq, Lk = dscores.shape
    ds = dscores.to(q.dtype).view(B * H, Lq, Lk)
    zero = _zero(q.dtype, q.device)  # beta=0: the scale inside the GEMMs, the added input ignored
    dq = torch.baddbmm(zero, ds, k.reshape(B * H, Lk, -1), beta=0, alpha=scale).view(q.shape)
    dk = torch.baddbmm(zero, ds.transpose(1, 2), q.reshape(B * H, Lq, -1), beta=0, alpha=scale).view(k.shape)
    return dq, dk, dv, dscores


def _prefix_grads(ctx, dscores, dk, k, dv, v) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`_ExplicitScores`' gradients of the key bias (the scores' summed over heads and queries) and of the
    straight-through weight (that of a factor on the first Lb keys and values), those its inputs need: [B, Lb] or
    None each. In float32 on CPU one compiled pass for both (`ltm_core.cpu_kernels.prefix_grads`)."""
    want_bias, want_through = ctx.needs_input_grad[3:5]
    (bias_dtype, through_dtype), lb = ctx.dtypes, ctx.lb
    if not (want_bias or want_through):
        return None, None
    if ctx.compiled:
        from ltm_core import cpu_kernels

        dbias, dthrough = cpu_kernels.prefix_grads(dscores, dk, k, dv, v, lb)
    else:
        dbias = dscores[..., :lb].sum(dim=(1, 2)) if want_bias else None  # [B, Lb]
        dthrough = _factor_grad(((dk, k), (dv, v)), lb, k.shape[-1], dscores.dtype) if want_through else None
    return (dbias.to(bias_dtype) if want_bias else None), (dthrough.to(through_dtype) if want_through else None)
