"""Triton kernels for the fused elementwise / row-wise ops: RMSNorm (+ residual add), SwiGLU, the gated memory
write and the compression gate. All math in fp32; outputs in the input dtype.

Imports triton at top level: only imported lazily, from the triton path of the dispatcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreting, next_pow2


def _elementwise_block() -> int:
    return 4096 if interpreting() else 1024


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [R, N] with unit stride on the last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


def _row_block(n_cols: int) -> tuple[int, int, int]:
    block_n = max(16, next_pow2(n_cols))
    block_r = max(1, min(64, 4096 // block_n))
    num_warps = 4 if block_n * block_r <= 4096 else (8 if block_n * block_r <= 16384 else 16)
    return block_r, block_n, num_warps


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm


@triton.jit
def _rms_fwd(X, R, W, Y, H, RSTD, sx, sr, sy, sh, n_rows, N, eps,
             HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(X + rows64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows64 * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hs = (h + r).to(H.dtype.element_ty)  # the returned sum, rounded like `x + residual`
        tl.store(H + rows64 * sh + cols[None, :], hs, mask=mask)
        h = hs.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_bwd(DY, DS, H, W, RSTD, DX, DW, sdy, sds, sh, sdx, n_rows, N,
             HAS_DS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for start in range(pid * BLOCK_R, n_rows, n_prog * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + rows64 * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + rows64 * sh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        g = dy * w[None, :]
        c = tl.sum(g * h, 1) / N
        dh = rstd[:, None] * g - h * (rstd * rstd * rstd * c)[:, None]
        if HAS_DS:
            dh += tl.load(DS + rows64 * sds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * sdx + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
        dw += dy * h * rstd[:, None]
    tl.store(DW + pid.to(tl.int64) * N + cols, tl.sum(dw, 0), mask=col_ok)


class RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps: float):
        shape, N = x.shape, x.shape[-1]
        x2 = _rows(x)
        R = x2.shape[0]
        y = torch.empty((R, N), dtype=x.dtype, device=x.device)
        rstd = torch.empty((R,), dtype=torch.float32, device=x.device)
        block_r, block_n, nw = _row_block(N)
        grid = (triton.cdiv(R, block_r),)
        w = weight.contiguous()
        if residual is not None:
            r2 = _rows(residual)
            h = torch.empty((R, N), dtype=torch.result_type(x, residual), device=x.device)
            _rms_fwd[grid](x2, r2, w, y, h, rstd, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), R, N, eps,
                           HAS_RES=True, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=nw)
        else:
            h = x2
            _rms_fwd[grid](x2, x2, w, y, y, rstd, x2.stride(0), 0, y.stride(0), 0, R, N, eps,
                           HAS_RES=False, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=nw)
        ctx.save_for_backward(h, w, rstd)
        ctx.shape, ctx.has_residual, ctx.x_dtype = shape, residual is not None, x.dtype
        ctx.r_dtype = None if residual is None else residual.dtype
        y = y.view(shape)
        if residual is None:
            return y
        return y, h.view(shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        h, w, rstd = ctx.saved_tensors
        R, N = h.shape
        dy2 = _rows(dy)
        ds2 = _rows(ds) if ds is not None else None
        dx = torch.empty((R, N), dtype=h.dtype, device=h.device)
        block_r, block_n, nw = _row_block(N)
        n_prog = max(1, min(triton.cdiv(R, block_r), 4 * _num_sms(h.device)))
        dw_part = torch.empty((n_prog, N), dtype=torch.float32, device=h.device)
        _rms_bwd[(n_prog,)](dy2, dy2 if ds2 is None else ds2, h, w, rstd, dx, dw_part,
                            dy2.stride(0), 0 if ds2 is None else ds2.stride(0), h.stride(0), dx.stride(0), R, N,
                            HAS_DS=ds2 is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=nw)
        dw = dw_part.sum(0).to(w.dtype)
        dx = dx.view(ctx.shape)
        if not ctx.has_residual:
            return dx.to(ctx.x_dtype), dw, None, None
        return dx.to(ctx.x_dtype), dw, dx.to(ctx.r_dtype), None


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU


@triton.jit
def _swiglu_fwd(G, U, O, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(O + offs, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(G, U, DO, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DG + offs, (d * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (d * g * sig).to(DU.dtype.element_ty), mask=mask)


class SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        block = _elementwise_block()
        _swiglu_fwd[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        block = _elementwise_block()
        _swiglu_bwd[(triton.cdiv(n, block),)](gate, up, dout, dg, du, n, BLOCK=block)
        return dg, du


# ----------------------------------------------------------------------------------------------------------------
# gated memory write: out = (1 - u) * mem + u * new, u = sigmoid(logits)


@triton.jit
def _memupd_fwd(M, NEW, L, O, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    nw = tl.load(NEW + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.sigmoid(tl.load(L + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(O + offs, (m + u * (nw - m)).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _memupd_bwd(M, NEW, L, DO, DM, DN, DL, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    nw = tl.load(NEW + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.sigmoid(tl.load(L + offs, mask=mask, other=0.0).to(tl.float32))
    d = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DM + offs, (d * (1.0 - u)).to(DM.dtype.element_ty), mask=mask)
    tl.store(DN + offs, (d * u).to(DN.dtype.element_ty), mask=mask)
    tl.store(DL + offs, (d * (nw - m) * u * (1.0 - u)).to(DL.dtype.element_ty), mask=mask)


class MemoryUpdateTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, new, logits):
        mem, new, logits = mem.contiguous(), new.contiguous(), logits.contiguous()
        out = torch.empty_like(mem)
        n = mem.numel()
        block = _elementwise_block()
        _memupd_fwd[(triton.cdiv(n, block),)](mem, new, logits, out, n, BLOCK=block)
        ctx.save_for_backward(mem, new, logits)
        return out

    @staticmethod
    def backward(ctx, dout):
        mem, new, logits = ctx.saved_tensors
        dout = dout.contiguous()
        dm, dn, dl = torch.empty_like(mem), torch.empty_like(new), torch.empty_like(logits)
        n = mem.numel()
        block = _elementwise_block()
        _memupd_bwd[(triton.cdiv(n, block),)](mem, new, logits, dout, dm, dn, dl, n, BLOCK=block)
        return dm, dn, dl


# ----------------------------------------------------------------------------------------------------------------
# compression gate: out = c * sigmoid(logits), c [R, D], logits [R]


@triton.jit
def _gate_fwd(C, L, O, n_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < D)[None, :]
    idx = rows.to(tl.int64)[:, None] * D + cols[None, :]
    c = tl.load(C + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(tl.load(L + rows, mask=row_ok, other=0.0).to(tl.float32))
    tl.store(O + idx, (c * s[:, None]).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd(C, L, DO, DC, DL, n_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < D)[None, :]
    idx = rows.to(tl.int64)[:, None] * D + cols[None, :]
    c = tl.load(C + idx, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(DO + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(tl.load(L + rows, mask=row_ok, other=0.0).to(tl.float32))
    tl.store(DC + idx, (d * s[:, None]).to(DC.dtype.element_ty), mask=mask)
    dl = tl.sum(d * c, 1) * s * (1.0 - s)
    tl.store(DL + rows, dl.to(DL.dtype.element_ty), mask=row_ok)


class CompressGateTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, logits):
        shape, D = c.shape, c.shape[-1]
        c2 = c.contiguous().view(-1, D)
        l1 = logits.contiguous().view(-1)
        out = torch.empty_like(c2)
        block_r, block_d, nw = _row_block(D)
        _gate_fwd[(triton.cdiv(c2.shape[0], block_r),)](c2, l1, out, c2.shape[0], D,
                                                        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=nw)
        ctx.save_for_backward(c2, l1)
        ctx.shapes = (shape, logits.shape)
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout):
        c2, l1 = ctx.saved_tensors
        D = c2.shape[1]
        d2 = dout.contiguous().view(-1, D)
        dc, dl = torch.empty_like(c2), torch.empty_like(l1)
        block_r, block_d, nw = _row_block(D)
        _gate_bwd[(triton.cdiv(c2.shape[0], block_r),)](c2, l1, d2, dc, dl, c2.shape[0], D,
                                                        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=nw)
        return dc.view(ctx.shapes[0]), dl.view(ctx.shapes[1])
