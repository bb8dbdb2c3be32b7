"""Building blocks shared by the backbone and the memory kinds: RMSNorm, rotary embeddings (and the rotated q|k|v of a
projection), the causal depthwise convolution, row gathering, the cache of constant tensors."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm_core import ops
from ltm_core.ops import use_cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.backend)


def constant_tensors(fn: Callable) -> Callable:
    """Cache a function of hashable arguments (sizes, flags, a device) that builds constant tensors (masks, tables,
    indices): each result is built once per arguments, as ordinary tensors (outside inference mode and autograd, so a
    training step may save one for backward after a generation built it), and shared: callers never modify it. On CPU
    each build is several small ops per call that a training pass repeats per layer; on CUDA as many launches. Under
    torch.compile the function runs uncached (traced into the graph)."""
    cached = functools.lru_cache(maxsize=128)(fn)

    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return cached(*args)
        return cached(*args)

    call.cache_clear = cached.cache_clear
    return call


@constant_tensors
def rotary_positions(length: int, head_dim: int, theta: float,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_tables` of the positions 0 .. length - 1 (a whole segment's), made once per arguments."""
    return rotary_tables(torch.arange(length, device=device), head_dim, theta)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] -> cos, sin: [T, head_dim] (fp32) in the form `apply_rotary` takes: the angles' cosines
    [cos, cos] and signed sines [-sin, sin] over the two halves of a head."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(1) * inv_freq  # [T, hd/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; rotates pairs (x[..., :hd/2], x[..., hd/2:]) by the angles of `rotary_tables`:
    [x1 cos - x2 sin, x2 cos + x1 sin] = x * [cos, cos] + [x2, x1] * [-sin, sin] (three ops, not seven)."""
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).type_as(x)


def rotary_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of `apply_rotary`'s input from its output's dy [..., T, hd]: dy * [cos, cos] + roll(dy * [-sin,
    sin]) = the rotation by the opposite angles (rolling by half a head is its own inverse, and roll([-sin, sin]) =
    -[-sin, sin])."""
    return apply_rotary(dy, cos, -sin)


def rotated_qkv(proj: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, backend: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj: [B, T, 3 H hd] a q|k|v projection, cos, sin: [T, hd] (`rotary_tables`) -> q, k rotated, v [B, H, T, hd].
    In float32 on CPU (`use_cpu_kernels`) one compiled pass each way (`ltm_core.cpu_kernels`), writing contiguous
    heads, where the rotations' PyTorch ops (the reference, and the path everywhere else) write three temporaries each
    way per tensor."""
    if use_cpu_kernels(proj, backend):
        return _RotatedQKV.apply(proj, cos, sin, heads)
    B, T, _ = proj.shape
    q, k, v = proj.view(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class _RotatedQKV(torch.autograd.Function):
    """`rotated_qkv` through the compiled CPU kernels."""

    @staticmethod
    def forward(ctx, proj, cos, sin, heads):
        from ltm_core import cpu_kernels

        ctx.save_for_backward(cos, sin)
        return cpu_kernels.rotated_qkv_forward(proj, cos, sin, heads)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        from ltm_core import cpu_kernels

        cos, sin = ctx.saved_tensors
        return cpu_kernels.rotated_qkv_backward(dq, dk, dv, cos, sin), None, None, None


def causal_conv(x: torch.Tensor, weight: torch.Tensor, before: Optional[torch.Tensor], backend: str = "auto",
                residual: bool = False) -> torch.Tensor:
    """x: [B, S, C], weight: [C, K] (one weight per channel and tap), before: [B, K - 1, C] what precedes x (None:
    zeros) -> the causal depthwise convolution [B, S, C]: output t mixes inputs t - K + 1 .. t; plus x itself with
    `residual`. In float32 on CPU (`use_cpu_kernels`) one compiled pass each way over the [B, S, C] rows
    (`ltm_core.cpu_kernels`; the residual inside it), where `conv1d` needs the channels first (two transposed copies)
    and its CPU backward is slow at batch 1; `conv1d` is the reference."""
    if before is None:
        before = x.new_zeros(x.shape[0], weight.shape[1] - 1, x.shape[2])
    if use_cpu_kernels(x, backend) and weight.dtype == before.dtype == torch.float32:
        from ltm_core.cpu_kernels import NO_CUTS

        return _CausalConv.apply(x, weight, before, residual, NO_CUTS)
    xt = torch.cat([before.to(x.dtype), x], 1).transpose(1, 2)  # [B, C, K - 1 + S]
    y = F.conv1d(xt, weight.to(x.dtype).unsqueeze(1), groups=x.shape[2]).transpose(1, 2)
    return x + y if residual else y


def windowed_conv(x: torch.Tensor, weight: torch.Tensor, before: torch.Tensor, starts: np.ndarray) -> torch.Tensor:
    """In float32 on CPU (`use_cpu_kernels`): x [B, ..., C] (T tokens in order), weight [C, K], before [B, K - 1, C],
    starts [T] int64 the first token of each token's BPTT window -> x + the causal depthwise convolution of [before;
    x], shaped as x, in one compiled pass each way, where an input passes no gradient to a later window's outputs:
    what a convolution restarted at every window from the previous window's last inputs, detached, gives (its
    reference, `Block._short_conv_window`'s PyTorch path)."""
    return _CausalConv.apply(x, weight, before, True, starts)


class _CausalConv(torch.autograd.Function):
    """`causal_conv` / `windowed_conv` through the compiled CPU kernels: the gradients of x, the weight and the
    inputs before x."""

    @staticmethod
    def forward(ctx, x, weight, before, residual, starts):
        from ltm_core import cpu_kernels

        x, weight, before = x.contiguous(), weight.contiguous(), before.contiguous()
        ctx.save_for_backward(x, weight, before)
        ctx.residual, ctx.starts = residual, starts
        return cpu_kernels.causal_conv_forward(x, before, weight, residual)

    @staticmethod
    def backward(ctx, dy):
        from ltm_core import cpu_kernels

        x, weight, before = ctx.saved_tensors
        dx, dbefore, dweight = cpu_kernels.causal_conv_backward(dy, x, before, weight, ctx.residual, ctx.starts)
        return dx, dweight, dbefore, None, None


def project_chunks(linear: nn.Module, x: torch.Tensor, first: int, chunks: int) -> torch.Tensor:
    """The columns of linear(x) from chunk `first` on, of `chunks` equal ones side by side (q|k|v: first=1 -> k|v):
    x [B, n, in] -> [B, n, (chunks - first) out / chunks], with only those columns' weights multiplied. A
    tensor-parallel linear (`ltm_core.parallel.tensor_parallel`) has its own `project_chunks` (its local columns of
    those chunks, the input gradient all-reduced)."""
    own = getattr(linear, "project_chunks", None)
    if own is not None:
        return own(x, first)
    if not linear.weight.is_floating_point():  # a quantized projection (bitsandbytes): all columns, then those
        y = linear(x)
        return y[..., y.shape[-1] // chunks * first:]
    weight = linear.weight.view(chunks, -1, linear.in_features)[first:].reshape(-1, linear.in_features)
    bias = None if linear.bias is None else linear.bias.view(chunks, -1)[first:].reshape(-1)
    return F.linear(x, weight, bias)


def gather_rows(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """pool: [B, P, ...], rows: [B, R] indices into each batch element's P rows -> pool's rows [B, R, ...].

    One `index_select` over the flattened batch: its backward is an `index_add` that keeps only the indices (not the
    pool, as `gather`'s does), and on CPU it runs faster than the `index_put` behind advanced indexing."""
    B, P = pool.shape[:2]
    return pool.flatten(0, 1).index_select(0, flat_rows(rows, P)).view(B, rows.shape[1], *pool.shape[2:])


def flat_rows(rows: torch.Tensor, pool_rows: int) -> torch.Tensor:
    """rows: [B, ...] indices into each batch element's `pool_rows` rows -> [B ...] indices into the B pools' rows
    flattened (batch-major)."""
    B = rows.shape[0]
    return rows.flatten() if B == 1 else (rows.flatten(1) + pool_rows * torch.arange(B, device=rows.device)[:, None]
                                          ).flatten()
