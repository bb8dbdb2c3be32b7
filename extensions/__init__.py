"""ltm_extensions: Triton GPU kernels with PyTorch references.

Every public function takes `backend="auto"|"triton"|"torch"`:
  - "torch": the plain-PyTorch reference (`ltm_extensions.reference`, autograd.Functions with hand-written backward);
  - "triton": the Triton kernel, forced (CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`);
  - "auto": Triton iff the tensors are on CUDA and triton can be imported, else the reference.

Triton is optional: it is only imported inside the Triton path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._backend import BACKENDS, interpreting, triton_importable, use_triton
from .reference import (attention_mask, compress_gate_ref, flash_attention_ref, memory_update_ref, rms_norm_ref,
                        swiglu_ref)

__all__ = [
    "BACKENDS",
    "attention_mask",
    "compress_gate",
    "flash_attention",
    "interpreting",
    "memory_update",
    "rms_norm",
    "swiglu",
    "triton_importable",
]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, prefix_len: int = 0,
                    window: Optional[int] = None, scale: Optional[float] = None, backend: str = "auto",
                    key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention with a non-causal memory prefix. q: [B, H, Lq, d]; k, v: [B, H, Lk, d] -> [B, H, Lq, d].

    Keys [0, prefix_len) are visible to every query; keys [prefix_len, Lk) are the segment, whose last Lq
    positions are the queries (bottom-right alignment). `causal` masks future segment keys; `window=w` lets the
    query at segment position p see segment keys in (p - w, p]. Same rule as `ltm_core.attention.attention_mask`.
    `key_bias` [B, prefix_len] adds to the prefix keys' scores, for every head and query (with its gradient).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q, k, v of shape [B, H, L, d], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != (B, H, lk, d) or v.shape != (B, H, lk, d):
        raise ValueError(f"k and v must be [B, H, Lk, d] = [{B}, {H}, Lk, {d}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not 0 <= prefix_len <= lk:
        raise ValueError(f"prefix_len must be in [0, {lk}], got {prefix_len}")
    if causal and lq > lk - prefix_len:
        raise ValueError(f"{lq} queries need at least as many segment keys, got {lk - prefix_len}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_bias is not None and tuple(key_bias.shape) != (B, prefix_len):
        raise ValueError(f"key_bias must be [B, prefix_len] = [{B}, {prefix_len}], got {tuple(key_bias.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    reference = dict(causal=causal, prefix_len=prefix_len, window=window, scale=scale, key_bias=key_bias)
    if use_triton(backend, q, k, v):
        unsupported = None
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            unsupported = f"the Triton flash attention supports fp32/fp16/bf16, got {q.dtype}"
        elif d > 256:
            unsupported = f"the Triton flash attention supports head dims up to 256, got {d}"
        if unsupported is not None:
            if backend == "triton":
                raise ValueError(unsupported)
            return flash_attention_ref(q, k, v, **reference)
        if lq == 0 or lk == 0 or B * H == 0:
            return flash_attention_ref(q, k, v, **reference)
        from ._triton_attention import flash_attention_triton

        return flash_attention_triton(q, k, v, bool(causal), int(prefix_len), window, float(scale), key_bias)
    return flash_attention_ref(q, k, v, **reference)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: Optional[float] = None,
             residual: Optional[torch.Tensor] = None, backend: str = "auto"):
    """RMSNorm over the last dim, optionally fused with a residual add.

    Returns `normed` (= x * rsqrt(mean(x^2) + eps) * weight), or, when `residual` is given, `(normed, x + residual)`
    with the norm taken of `x + residual`. `eps=None` uses `torch.finfo(x.dtype).eps` like `F.rms_norm`.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if use_triton(backend, *tensors) and x.numel() > 0:
        from ._triton_fused import RMSNormTriton

        return RMSNormTriton.apply(x, weight, residual, float(eps))
    return rms_norm_ref(x, weight, eps, residual)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up (broadcasting; computed in fp32, returned in the promoted dtype)."""
    gate, up = _broadcast_promote(gate, up)
    if use_triton(backend, gate, up) and gate.numel() > 0:
        from ._triton_fused import SwiGLUTriton

        return SwiGLUTriton.apply(gate, up)
    return swiglu_ref(gate, up)


def memory_update(mem: torch.Tensor, new: torch.Tensor, update_logits: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """Gated memory write: u = sigmoid(update_logits); (1 - u) * mem + u * new (broadcasting)."""
    mem, new, update_logits = _broadcast_promote(mem, new, update_logits)
    if use_triton(backend, mem, new, update_logits) and mem.numel() > 0:
        from ._triton_fused import MemoryUpdateTriton

        return MemoryUpdateTriton.apply(mem, new, update_logits)
    return memory_update_ref(mem, new, update_logits)


def compress_gate(c: torch.Tensor, importance_logits: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Compression gate: c * sigmoid(importance_logits); c [..., D], importance_logits [..., 1] (broadcast)."""
    if importance_logits.shape[-1] != 1:
        raise ValueError(f"importance_logits must end in a dim of size 1, got {tuple(importance_logits.shape)}")
    lead = torch.broadcast_shapes(c.shape[:-1], importance_logits.shape[:-1])
    c = c.expand(*lead, c.shape[-1])
    importance_logits = importance_logits.expand(*lead, 1)
    dtype = torch.promote_types(c.dtype, importance_logits.dtype)
    c, importance_logits = c.to(dtype), importance_logits.to(dtype)
    if use_triton(backend, c, importance_logits) and c.numel() > 0:
        from ._triton_fused import CompressGateTriton

        return CompressGateTriton.apply(c, importance_logits)
    return compress_gate_ref(c, importance_logits)


def _broadcast_promote(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Broadcast to one shape and promote to one dtype; autograd reduces/casts the gradients back."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in torch.broadcast_tensors(*tensors)]
