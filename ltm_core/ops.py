"""Dispatch of the fused ops (RMSNorm, SwiGLU, compression gate, gated memory update) to the Triton kernels of
`ltm_extensions` or to plain PyTorch, by `model.kernels`:

    torch   PyTorch ops everywhere (also the tokens memory's write loop, which the others run compiled with Numba on
            CPU: ltm_core/memory/choice.py)
    triton  the Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests)
    auto    Triton on CUDA tensors when Triton is importable, PyTorch otherwise; under torch.compile
            (`model.compile=true`) PyTorch, which Inductor fuses into its own kernels

Attention has its own dispatch in `ltm_core.attention`: `auto` there takes the Triton kernel only for the masks where
it measured faster than SDPA (`AUTO_CHOICE`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_kernels(backend: str, x: torch.Tensor) -> bool:
    if backend == "triton":
        return True
    if backend != "auto" or not x.is_cuda or torch.compiler.is_compiling():
        return False
    from ltm_extensions import triton_importable

    return triton_importable()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """x: [..., C] -> x / rms(x) * weight."""
    if use_kernels(backend, x):
        from ltm_extensions import rms_norm as fused

        return fused(x, weight, eps, backend=backend)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up."""
    if use_kernels(backend, gate):
        from ltm_extensions import swiglu as fused

        return fused(gate, up, backend=backend)
    return F.silu(gate) * up


def compress_gate(c: torch.Tensor, importance_logits: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """c: [B, T, D], importance_logits: [B, T, 1] -> c * sigmoid(importance_logits)."""
    if use_kernels(backend, c):
        from ltm_extensions import compress_gate as fused

        return fused(c, importance_logits, backend=backend)
    return c * torch.sigmoid(importance_logits)


def memory_update(mem: torch.Tensor, new: torch.Tensor, update_logits: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """mem, new, update_logits: [B, M, D] -> (1 - u) * mem + u * new with u = sigmoid(update_logits)."""
    if use_kernels(backend, mem):
        from ltm_extensions import memory_update as fused

        return fused(mem, new, update_logits, backend=backend)
    u = torch.sigmoid(update_logits)
    return (1 - u) * mem + u * new
