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

BACKENDS = ("auto", "triton", "torch")


def attention_mask(lq: int, lk: int, *, causal: bool, prefix_len: int = 0, window: Optional[int] = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask [lq, lk], True where a query may attend to a key (the layout described above)."""
    seg_len = lk - prefix_len
    query_pos = torch.arange(lq, device=device).unsqueeze(1) + (seg_len - lq)  # (lq, 1) segment positions
    key_pos = torch.arange(lk, device=device).unsqueeze(0) - prefix_len  # (1, lk); < 0 for the prefix
    visible = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        visible &= key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    visible |= key_pos < 0  # the prefix is visible to every query
    return visible


def _triton_available(q: torch.Tensor) -> bool:
    if not q.is_cuda:
        return False
    try:
        import ltm_extensions  # noqa: F401
    except ImportError:
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, prefix_len: int = 0,
              window: Optional[int] = None, scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Softmax attention. q: [B, H, Lq, d]; k, v: [B, H, Lk, d] -> [B, H, Lq, d]."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    lq, lk = q.shape[-2], k.shape[-2]
    if causal and lq > lk - prefix_len:
        raise ValueError(f"{lq} queries need at least as many segment keys, got {lk - prefix_len}")
    if backend == "triton" or (backend == "auto" and _triton_available(q)):
        from ltm_extensions import flash_attention

        return flash_attention(q, k, v, causal=causal, prefix_len=prefix_len, window=window, scale=scale,
                               backend="triton" if backend == "triton" else "auto")
    if prefix_len == 0 and window is None and (lq == lk or not causal):
        # plain case: SDPA's fused kernels (flash / memory-efficient) apply
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and lq > 1, scale=scale)
    mask = attention_mask(lq, lk, causal=causal, prefix_len=prefix_len, window=window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
