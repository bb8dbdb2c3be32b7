"""Plain-PyTorch references of every kernel, each a `torch.autograd.Function` with a hand-written backward.

They compute in fp32 and return the input dtype, like the Triton kernels, and run on any device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def attention_mask(lq: int, lk: int, *, causal: bool, prefix_len: int = 0, window: Optional[int] = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask [lq, lk], True where query i may see key j.

    Same rule as `ltm_core.attention.attention_mask` (kept here so `ltm_extensions` does not import `ltm_core`):
    the first `prefix_len` keys are visible to every query; the segment's last `lq` positions are the queries;
    `causal` and `window` restrict the segment keys.
    """
    seg_len = lk - prefix_len
    query_pos = torch.arange(lq, device=device).unsqueeze(1) + (seg_len - lq)
    key_pos = torch.arange(lk, device=device).unsqueeze(0) - prefix_len
    visible = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        visible &= key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    visible |= key_pos < 0
    return visible


# ----------------------------------------------------------------------------------------------------------------
# attention


def with_key_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold a per-key score bias into one extra head dimension, so an attention without a score bias of its own
    (SDPA, whose fused kernels give a bias no gradient) computes softmax(q.k * scale + bias) with scale = hd ** -0.5
    of the original head dim (`ltm_core.attention.attention`'s fold; the Triton kernel takes the bias itself).

    q: [B, H, Lq, hd]; k, v: [B, H, Lk, hd]; bias: [B, Lb] for the first Lb <= Lk keys (the memory slots; the
    keys after them get none) -> q, k, v with head dim hd + 1: q gets a 1, k gets bias / scale, v a 0 (the output's
    last dimension is 0; drop it)."""
    B, H, Lk, hd = k.shape
    extra = bias.to(k.dtype) * hd ** 0.5  # [B, Lb]
    extra = F.pad(extra, (0, Lk - extra.shape[1]))[:, None, :, None].expand(B, H, Lk, 1)  # [B, H, Lk, 1]
    return (F.pad(q, (0, 1), value=1.0), torch.cat([k, extra], dim=-1), F.pad(v, (0, 1)))


class AttentionRef(torch.autograd.Function):
    """Softmax attention with the prefix/causal/window mask and an optional score bias on the prefix keys (bias
    [B, prefix_len], the same for every head and query); saves the logsumexp and recomputes P in backward."""

    @staticmethod
    def forward(ctx, q, k, v, bias, causal: bool, prefix_len: int, window: Optional[int], scale: float):
        lq, lk = q.shape[-2], k.shape[-2]
        mask = attention_mask(lq, lk, causal=causal, prefix_len=prefix_len, window=window, device=q.device)
        s = _scores(q, k, bias, scale).masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf on fully masked rows
        lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)  # -> p = 0 there
        p = torch.exp(s - lse)
        o = torch.matmul(p, v.float()).to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, o, lse)
        ctx.mask, ctx.scale = mask, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bias, o, lse = ctx.saved_tensors
        scale = ctx.scale
        do32 = do.float()
        p = torch.exp(_scores(q, k, bias, scale) - lse).masked_fill(~ctx.mask, 0.0)
        dv = torch.matmul(p.transpose(-1, -2), do32)
        dp = torch.matmul(do32, v.float().transpose(-1, -2))
        delta = (do32 * o.float()).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq = torch.matmul(ds, k.float()) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
        dbias = None if bias is None else ds[..., :bias.shape[1]].sum(dim=(1, 2)).to(bias.dtype)  # [B, prefix_len]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None, None


def _scores(q, k, bias, scale: float) -> torch.Tensor:
    """fp32 scores q k^T * scale [B, H, Lq, Lk], plus bias [B, P] on the first P keys when given."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        s[..., :bias.shape[1]] += bias.float()[:, None, None, :]
    return s


def flash_attention_ref(q, k, v, *, causal: bool = True, prefix_len: int = 0, window: Optional[int] = None,
                        scale: Optional[float] = None, key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return AttentionRef.apply(q, k, v, key_bias, causal, prefix_len, window, float(scale))


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)


class RMSNormRef(torch.autograd.Function):
    """normed = h * rsqrt(mean(h^2) + eps) * weight with h = x (+ residual); also returns h when residual given."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps: float):
        h = x if residual is None else (x + residual)
        hf = h.float()
        rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        y = (hf * rstd * weight.float()).to(x.dtype)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        if residual is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        hf = h.float()
        g = dy.float() * weight.float()
        n = h.shape[-1]
        dhf = rstd * g - hf * rstd.pow(3) * (g * hf).sum(-1, keepdim=True) / n
        if dh is not None:
            dhf = dhf + dh.float()
        dw = (dy.float() * hf * rstd).reshape(-1, n).sum(0)
        dx = dhf.to(h.dtype)
        return dx, dw.to(weight.dtype), (dx if ctx.has_residual else None), None


def rms_norm_ref(x, weight, eps: Optional[float] = None, residual=None):
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return RMSNormRef.apply(x, weight, residual, float(eps))


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU


class SwiGLURef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g = gate.float()
        out = (g * torch.sigmoid(g) * up.float()).to(gate.dtype)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        g, u, d = gate.float(), up.float(), dout.float()
        sig = torch.sigmoid(g)
        dgate = d * u * sig * (1 + g * (1 - sig))
        dup = d * g * sig
        return dgate.to(gate.dtype), dup.to(up.dtype)


def swiglu_ref(gate, up):
    return SwiGLURef.apply(gate, up)


# ----------------------------------------------------------------------------------------------------------------
# memory write and compression gate


class MemoryUpdateRef(torch.autograd.Function):
    """out = (1 - u) * mem + u * new, u = sigmoid(update_logits). All three of the same shape."""

    @staticmethod
    def forward(ctx, mem, new, logits):
        u = torch.sigmoid(logits.float())
        m, n = mem.float(), new.float()
        out = (m + u * (n - m)).to(mem.dtype)
        ctx.save_for_backward(mem, new, logits)
        return out

    @staticmethod
    def backward(ctx, dout):
        mem, new, logits = ctx.saved_tensors
        u = torch.sigmoid(logits.float())
        d = dout.float()
        dmem = d * (1 - u)
        dnew = d * u
        dlogits = d * (new.float() - mem.float()) * u * (1 - u)
        return dmem.to(mem.dtype), dnew.to(new.dtype), dlogits.to(logits.dtype)


def memory_update_ref(mem, new, update_logits):
    return MemoryUpdateRef.apply(mem, new, update_logits)


class CompressGateRef(torch.autograd.Function):
    """out = c * sigmoid(logits), c [..., D], logits [..., 1]."""

    @staticmethod
    def forward(ctx, c, logits):
        s = torch.sigmoid(logits.float())
        out = (c.float() * s).to(c.dtype)
        ctx.save_for_backward(c, logits)
        return out

    @staticmethod
    def backward(ctx, dout):
        c, logits = ctx.saved_tensors
        s = torch.sigmoid(logits.float())
        d = dout.float()
        dc = d * s
        dlogits = (d * c.float()).sum(-1, keepdim=True) * s * (1 - s)
        return dc.to(c.dtype), dlogits.to(logits.dtype)


def compress_gate_ref(c, importance_logits):
    return CompressGateRef.apply(c, importance_logits)
