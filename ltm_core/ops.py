"""Dispatch of the fused ops (RMSNorm, SwiGLU, compression gate, gated memory update) to the Triton kernels of
`ltm_extensions` or to plain PyTorch, by `model.kernels`, and the predicate of the compiled CPU passes
(`use_cpu_kernels`, `ltm_core.cpu_kernels`: the RMSNorm here, the rotations, convolution and read in their modules):

    torch   PyTorch ops everywhere (also the tokens memory's write loop, which the others run compiled with Numba on
            CPU: ltm_core/memory/choice.py)
    triton  the Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests)
    auto    Triton on CUDA tensors when Triton is importable, PyTorch otherwise; under torch.compile
            (`model.compile=true`) PyTorch, which Inductor fuses into its own kernels

Attention has its own dispatch in `ltm_core.attention`: `auto` there takes the Triton kernel only for the masks where
it measured faster than SDPA (`AUTO_CHOICE`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def use_kernels(backend: str, x: torch.Tensor) -> bool:
    if backend == "triton":
        return True
    if backend != "auto" or not x.is_cuda or torch.compiler.is_compiling():
        return False
    from ltm_extensions import triton_importable

    return triton_importable()


_forked = False  # set in a process forked from this one: OpenMP threads (Numba's, as PyTorch's) hang there


def _set_forked() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_set_forked)


def use_cpu_kernels(t: torch.Tensor, backend: str) -> bool:
    """Whether `ltm_core.cpu_kernels`' compiled passes replace PyTorch's ops for tensors like t: float32 on CPU,
    outside torch.compile and outside CPU autocast (`precision=bf16-mixed`: t may be float32 while the operands
    autocast makes beside it, a projection's output, are bfloat16, which the kernels do not take), unless
    `model.kernels=torch`; not in a process forked from another (a data loader's worker, where OpenMP threads hang:
    PyTorch's own ops run there, one thread each)."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and backend != "torch"
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu") and not _forked)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """x: [..., C] -> x / rms(x) * weight. In float32 on CPU (`use_cpu_kernels`) one compiled pass each way
    (`ltm_core.cpu_kernels`), where PyTorch's CPU norm runs as five ops forward and a dozen backward."""
    if use_kernels(backend, x):
        from ltm_extensions import rms_norm as fused

        return fused(x, weight, eps, backend=backend)
    if use_cpu_kernels(x, backend) and weight.dtype == torch.float32:
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class _RMSNorm(torch.autograd.Function):
    """`rms_norm` through the compiled CPU kernels: x [..., C], weight [C] -> y; saves x (contiguous) and each row's
    1 / rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from ltm_core import cpu_kernels

        x = x.contiguous()
        y, rstd = cpu_kernels.rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ltm_core import cpu_kernels

        x, weight, rstd = ctx.saved_tensors
        dx, dweight = cpu_kernels.rms_norm_backward(dy, x, weight, rstd)
        return dx, dweight, None


def swiglu(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """gate_up: [..., 2 F] the gate and up projections side by side -> silu(gate) * up [..., F]. In float32 on CPU
    (`use_cpu_kernels`) one autograd node (`_SwiGLU`) whose backward writes both gradients into one tensor, where
    autograd's three nodes concatenate them (a copy of the whole projection's gradient per call)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if use_kernels(backend, gate):
        from ltm_extensions import swiglu as fused

        return fused(gate, up, backend=backend)
    if use_cpu_kernels(gate_up, backend):
        return _SwiGLU.apply(gate_up)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """`swiglu` on CPU in float32: gate_up [..., 2 F] -> silu(gate) * up; saves gate_up and silu(gate) (what the
    reference's ops save); PyTorch's ops, their gradients written in place into the halves of one tensor."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        s = F.silu(gate)
        ctx.save_for_backward(gate_up, s)
        return s * up

    @staticmethod
    def backward(ctx, dy):
        gate_up, s = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        dgate_up = torch.empty_like(gate_up)
        dgate, dup = dgate_up.chunk(2, dim=-1)
        torch.mul(dy, s, out=dup)
        torch.ops.aten.silu_backward.grad_input(dy * up, gate, grad_input=dgate)
        return dgate_up


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
