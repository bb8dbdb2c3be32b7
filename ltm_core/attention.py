"""The one attention dispatch.

Every attention in the model (segment self-attention, memory-as-context, memory read) calls `attention()`.
The default backend is PyTorch's `scaled_dot_product_attention`; the Triton flash kernel from
`ltm_extensions` plugs in here (`backend="triton"`, or `"auto"` on CUDA when Triton is importable).

Key layout: the first `prefix_len` keys (memory slots) are visible to every query; the remaining
`Lk - prefix_len` keys are the segment, whose last `Lq` positions the queries are (bottom-right alignment,
so a KV cache with Lq < Lk works). `causal` applies to the segment part; `window=w` lets a query at segment
position p see segment keys in (p - w, p].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ltm_core.ops import use_kernels
from ltm_extensions.reference import attention_mask  # the one statement of the mask rule

__all__ = ["attention", "attention_mask"]

BACKENDS = ("auto", "triton", "torch")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, prefix_len: int = 0,
              window: Optional[int] = None, scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Softmax attention. q: [B, H, Lq, d]; k, v: [B, H, Lk, d] -> [B, H, Lq, d]."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    lq, lk = q.shape[-2], k.shape[-2]
    if causal and lq > lk - prefix_len:
        raise ValueError(f"{lq} queries need at least as many segment keys, got {lk - prefix_len}")
    if use_kernels(backend, q):
        from ltm_extensions import flash_attention

        return flash_attention(q, k, v, causal=causal, prefix_len=prefix_len, window=window, scale=scale,
                               backend="triton" if backend == "triton" else "auto")
    if prefix_len == 0 and window is None and (lq == lk or not causal):
        # plain case: SDPA's fused kernels (flash / memory-efficient) apply
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and lq > 1, scale=scale)
    mask = attention_mask(lq, lk, causal=causal, prefix_len=prefix_len, window=window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
