"""Compiled CPU passes (Numba) of the model's hot spots in float32, each with its PyTorch reference.

**The window read's keys and values** (`kept_rows_forward` / `_backward`). `_KeptKeysValues` (ltm_core/model.py)
turns the q|k|v projection of the pass's segments and the k|v projection of the tokens held at each window's start
into the read's inputs: rotated queries, and for every segment [its kept tokens' keys; its own keys rotated] and the
same of the values. In PyTorch that is a dozen strided copies and rotations, each writing a temporary (the rotation
alone three), whose backward adds a dozen more; here each direction is one pass over the rows, split over segments.
`model=tiny`'s training step at 8K takes 0.93x the time with this pass (docs/benchmarks.md).

    forward:   q[s]       = rotate(q row s)                        per segment, head
               keys[:M]   = k rows of the kept tokens;  keys[M:]   = rotate(k rows of the segment)
               values[:M] = v rows of the kept tokens;  values[M:] = v rows of the segment
    backward:  the rows' gradient = the inverse rotations of dq and the segment's dkeys, its dvalues, and every
               segment's dkeys / dvalues of its kept tokens added to their rows (held or segment rows)

The rotation is `ltm_core.layers.apply_rotary`'s: y = x * [cos, cos] + [x2, x1] * [-sin, sin] over a head's halves.
Every other model's segment attention (the baselines, the segment-by-segment path, generation) takes its rotated
q|k|v from the same rotation (`rotated_qkv_forward` / `_backward`, for `ltm_core.layers.rotated_qkv`), so the
baselines rotate as fast as the memory model.

**The prefix read's key-bias and straight-through gradients**: the score gradients of the kept keys summed over
heads and queries, and sum (dk k + dv v) over heads and dims; for the window read in the kept rows' backward pass
above (`kept_rows_backward` given the read, for `ltm_core.model._KeptRead`, which makes the kept keys and values and
the read one autograd node), for every other explicit-scores read in one pass of their own (`prefix_grads`, for
`ltm_core.attention`'s `_ExplicitScores`). **RMSNorm** (`rms_norm_forward` / `_backward`, for
`ltm_core.ops.rms_norm`): one pass each way, where PyTorch's CPU norm is five ops forward and a dozen backward. **The
tokens memory's writes and scan**: the writes' choice loop and the scan's bookkeeping over BPTT windows (`_choose`,
`_window_rows`; `ltm_core.memory.choice` states the steps and calls them for the segment-by-segment path) run
inside the scan's forward pass (`scan_forward` / `_backward`, for `ltm_core.memory.tokens`' `_CompiledScan`): one
call per layer and pass makes the choices, every pool row's importance, each segment's read prefix from the rows it
holds (the score bias and the straight-through weight: a row held over from an earlier BPTT window passes its
gradient to w and b only), the state after the scan, the rows the read projects at the windows' starts (each token
once, however many windows' starts hold it) and the writes' penalty; in backward the gradients of the state, the
entries, w and b. Inside a training step a small call costs several times what it costs alone, and the memory
model's extra calls weigh as much as its extra arithmetic (docs/benchmarks.md): hence few, large passes.

**The short causal depthwise convolution** (`causal_conv_forward` / `_backward`, for `ltm_core.layers.causal_conv`):
over the [B, T, C] rows as they are (conv1d wants [B, C, T]: a transposed copy each way), vectorised over channels:

    y[t]  = (x[t]) + sum_k w[:, k] * xin[t + k]        xin = [the K - 1 inputs before x; x], read in place
    dxin[j] = (dy[j]) + sum_k w[:, k] * dy[j - k]      dw[:, k] = sum_t dy[t] * xin[t + k]

(the bracketed terms: with the residual, y = x + the convolution, as the model's blocks use it.) A layer-major pass
convolves all its BPTT windows in one call (`ltm_core.layers.windowed_conv`): its backward leaves out the terms of
dxin[j] from outputs of a later window than token j's (those outputs read j detached: truncated BPTT).

The PyTorch ops are the reference, and the path for half precision, GPUs, torch.compile, `model.kernels=torch` and
forked processes, where OpenMP threads hang (`ltm_core.ops.use_cpu_kernels`); tests compare the two. Every
parallel loop splits between as many threads as PyTorch's, on PyTorch's own OpenMP pool (Numba's OpenMP layer binds
to the libgomp that PyTorch loaded first). Between the model's large ops every PyTorch call costs microseconds, so
the wrappers make as few as they can (`_array`; the weight gradients' block sums inside the passes).
"""

from __future__ import annotations

import threading
from typing import Optional

import numba
import numpy as np
import torch
from numba import prange


def compiled(fn, fastmath=False, parallel=False):
    """fn compiled by Numba (nopython, the GIL released; `parallel`: its `numba.prange` loops split between threads),
    cached on disk where Numba finds a writable place, else for the process alone (a read-only install without a
    writable home)."""
    try:
        return numba.njit(cache=True, nogil=True, fastmath=fastmath, parallel=parallel)(fn)
    except RuntimeError:  # nowhere to cache it
        return numba.njit(nogil=True, fastmath=fastmath, parallel=parallel)(fn)


def _rotate(x, c, s, y):
    """y = x rotated by one position's angles (`ltm_core.layers.apply_rotary`'s rotation): x, c, s, y [hd]."""
    half = x.shape[0] // 2
    for d in range(half):  # y1 = x1 c1 + x2 s1, y2 = x2 c2 + x1 s2
        x1, x2 = x[d], x[d + half]
        y[d] = x1 * c[d] + x2 * s[d]
        y[d + half] = x2 * c[d + half] + x1 * s[d + half]


def _unrotate(g, c, s, dx):
    """dx = the gradient of `_rotate`'s x from its y's gradient g: the rotation by the opposite angles."""
    half = g.shape[0] // 2
    for d in range(half):
        g1, g2 = g[d], g[d + half]
        dx[d] = g1 * c[d] + g2 * s[d + half]
        dx[d + half] = g1 * s[d] + g2 * c[d + half]


_rotate = numba.njit(inline="always", fastmath=True)(_rotate)  # inlined into the kernels below
_unrotate = numba.njit(inline="always", fastmath=True)(_unrotate)


def _prefix_sums(dscores, dk, k, dv, v, dbias, dthrough):
    """One batch row of a prefix read: dscores [H, Lq, Lk] its score gradients, dk, k, dv, v [H, Lk, d] its keys
    and values and their gradients -> writes, over its first Lb keys, dbias [Lb] = sum_{h, i} dscores and dthrough
    [Lb] = sum_{h, e} (dk k + dv v): the key bias's and the straight-through weight's gradients."""
    H, Lq, _ = dscores.shape
    Lb, d = dbias.shape[0], k.shape[2]
    for j in range(Lb):
        dbias[j] = 0.0
        dthrough[j] = 0.0
    for h in range(H):
        for i in range(Lq):
            row = dscores[h, i]
            for j in range(Lb):
                dbias[j] += row[j]
        for j in range(Lb):
            dkj, kj, dvj, vj = dk[h, j], k[h, j], dv[h, j], v[h, j]
            acc = np.float32(0.0)  # float32, as the arrays (a float64 sum converts every product)
            for e in range(d):
                acc += dkj[e] * kj[e] + dvj[e] * vj[e]
            dthrough[j] += acc


def _sum_blocks(parts, out):
    """parts [n, C] a weight gradient summed over n blocks of rows apart -> writes out [C] = their sum, the blocks
    in order (a fixed order, whatever the thread count)."""
    for c in range(out.shape[0]):
        out[c] = 0.0
    for p in range(parts.shape[0]):
        for c in range(out.shape[0]):
            out[c] += parts[p, c]


_prefix_sums = numba.njit(inline="always", fastmath=True)(_prefix_sums)
_sum_blocks = numba.njit(inline="always", fastmath=True)(_sum_blocks)


def _forward(proj, held, flat, cos, sin, segments, slots, q, keys, values):
    """proj [B W S, 3, H, hd] the segments' q|k|v rows, held [B R, 2, H, hd] the held tokens' k|v rows, flat [B W M]
    each segment's kept rows (into the B pools [held; segments] of P = R + W S rows), cos, sin [S, hd] -> writes
    q [B W, H, S, hd], keys, values [B W, H, M + S, hd] (W = `segments`, M = `slots`)."""
    BW, H, S, hd = q.shape
    M, R = slots, held.shape[0] * segments // BW
    P = R + segments * S
    for bw in prange(BW):  # one segment per iteration, split between the threads
        for h in range(H):
            for m in range(M):
                r = flat[bw * M + m]
                b, i = r // P, r % P
                if i < R:
                    for d in range(hd):
                        keys[bw, h, m, d] = held[b * R + i, 0, h, d]
                        values[bw, h, m, d] = held[b * R + i, 1, h, d]
                else:
                    row = b * segments * S + i - R
                    for d in range(hd):
                        keys[bw, h, m, d] = proj[row, 1, h, d]
                        values[bw, h, m, d] = proj[row, 2, h, d]
            for s in range(S):
                row = bw * S + s
                _rotate(proj[row, 0, h], cos[s], sin[s], q[bw, h, s])
                _rotate(proj[row, 1, h], cos[s], sin[s], keys[bw, h, M + s])
                for d in range(hd):
                    values[bw, h, M + s, d] = proj[row, 2, h, d]


def _backward(dq, dkeys, dvalues, flat, cos, sin, segments, slots, dproj, dheld, dscores, keys, values, dbias,
              dthrough):
    """The gradients of `_forward`'s outputs -> writes dproj [B W S, 3, H, hd] and dheld [B R, 2, H, hd], those of
    its proj and held. With the read's score gradients dscores [B W, H, S, M + S] and its keys and values (`_forward`'s
    outputs), also its prefix's: dbias [B W, M] = sum_{h, i} dscores over the M kept keys, dthrough [B W, M] = sum_{h,
    e} (dkeys keys + dvalues values) there (`ltm_core.model._KeptRead`); dbias empty [B W, 0]: none."""
    BW, H, S, hd = dq.shape
    M, R = slots, dheld.shape[0] * segments // BW
    P = R + segments * S
    Lb = dbias.shape[1]
    for r in prange(dheld.shape[0]):  # the held tokens' rows: only what the kept rows add
        for j in range(2):
            for h in range(H):
                for d in range(hd):
                    dheld[r, j, h, d] = 0.0
    for bw in prange(BW):
        for s in range(S):
            row = bw * S + s
            for h in range(H):
                _unrotate(dq[bw, h, s], cos[s], sin[s], dproj[row, 0, h])
                _unrotate(dkeys[bw, h, M + s], cos[s], sin[s], dproj[row, 1, h])
                for d in range(hd):
                    dproj[row, 2, h, d] = dvalues[bw, h, M + s, d]
        if Lb > 0:
            _prefix_sums(dscores[bw], dkeys[bw], keys[bw], dvalues[bw], values[bw], dbias[bw], dthrough[bw])
    for h in prange(H):  # the kept rows' gradients added, a head per thread: segments keep rows in common, heads not
        for bw in range(BW):
            for m in range(M):
                r = flat[bw * M + m]
                b, i = r // P, r % P
                if i < R:
                    for d in range(hd):
                        dheld[b * R + i, 0, h, d] += dkeys[bw, h, m, d]
                        dheld[b * R + i, 1, h, d] += dvalues[bw, h, m, d]
                else:
                    row = b * segments * S + i - R
                    for d in range(hd):
                        dproj[row, 1, h, d] += dkeys[bw, h, m, d]
                        dproj[row, 2, h, d] += dvalues[bw, h, m, d]


def _qkv_forward(proj, cos, sin, q, k, v):
    """proj [B, T, 3, H, hd] q|k|v rows, cos, sin [T, hd] -> writes q, k rotated and v [B, H, T, hd]."""
    B, H, T, hd = q.shape
    for bh in prange(B * H):  # one head of one sequence per iteration
        b, h = bh // H, bh % H
        for t in range(T):
            _rotate(proj[b, t, 0, h], cos[t], sin[t], q[b, h, t])
            _rotate(proj[b, t, 1, h], cos[t], sin[t], k[b, h, t])
            for d in range(hd):
                v[b, h, t, d] = proj[b, t, 2, h, d]


def _qkv_backward(dq, dk, dv, cos, sin, dproj):
    """The gradients of `_qkv_forward`'s outputs -> writes dproj [B, T, 3, H, hd], that of its proj."""
    B, H, T, hd = dq.shape
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        for t in range(T):
            _unrotate(dq[b, h, t], cos[t], sin[t], dproj[b, t, 0, h])
            _unrotate(dk[b, h, t], cos[t], sin[t], dproj[b, t, 1, h])
            for d in range(hd):
                dproj[b, t, 2, h, d] = dv[b, h, t, d]


_forward_kernel = compiled(_forward, fastmath=True, parallel=True)
_backward_kernel = compiled(_backward, fastmath=True, parallel=True)
_qkv_forward_kernel = compiled(_qkv_forward, fastmath=True, parallel=True)
_qkv_backward_kernel = compiled(_qkv_backward, fastmath=True, parallel=True)


WEIGHT_BLOCKS = 16  # the backward passes sum a weight's gradient over this many row blocks apart, then add them:
# a fixed order, whatever the thread count


_numba_threads = threading.local()  # .count: the thread count this thread last gave Numba (Numba's is per thread)


def _launch(kernel, *args):
    """kernel(*args) (its result) on as many threads as PyTorch's (`torch.set_num_threads`); Numba's count is set
    only when that changes (each setting cost 10-20 us inside a training step, and the step 1.03x: docs/benchmarks.md).
    Numba's first parallel launch starts its OpenMP layer, which sets the thread count of the OpenMP runtime PyTorch
    shares (a process at 1 thread went on at 2): PyTorch's count is put back."""
    threads = torch.get_num_threads()
    count = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if getattr(_numba_threads, "count", None) != count:
        numba.set_num_threads(count)
        _numba_threads.count = count
    result = kernel(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return result


def kept_rows_forward(proj: torch.Tensor, held: torch.Tensor, flat: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, segments: int, heads: int, slots: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj [B, W S, 3 H hd] and held [B, R, 2 H hd] float32, flat [B W M] the kept rows of [held; segments]
    (`layers.flat_rows`), cos, sin [S, hd] -> q [B W, H, S, hd], keys, values [B W, H, M + S, hd], contiguous."""
    B, R, _ = held.shape
    S, hd = cos.shape
    BW, M = B * segments, slots
    q = proj.new_empty(BW, heads, S, hd)
    keys, values = (proj.new_empty(BW, heads, M + S, hd) for _ in range(2))
    _launch(_forward_kernel, _rows(proj, 3, heads, hd), _rows(held, 2, heads, hd), _array(flat), _array(cos),
            _array(sin), segments, M, q.numpy(), keys.numpy(), values.numpy())
    return q, keys, values


def kept_rows_backward(dq: torch.Tensor, dkeys: torch.Tensor, dvalues: torch.Tensor, flat: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, held: int, segments: int, batch: int,
                       read: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                       proj: Optional[tuple[int, ...]] = None) -> tuple[torch.Tensor, ...]:
    """The gradients of `kept_rows_forward`'s outputs (`held`: its R) -> those of its proj (shaped `proj`, default
    [B, W S, 3 H hd]) and held [B, R, 2 H hd]. read: (the read's score gradients [B W, H, S, M + S], its keys,
    values) -> also those of its prefix's key bias and straight-through weight [B W, M] (`ltm_core.model._KeptRead`).
    The kernel's row views are NumPy's: no PyTorch view."""
    BW, H, S, hd = dq.shape
    M = dkeys.shape[2] - S
    dproj = dq.new_empty(proj if proj is not None else (batch, BW // batch * S, 3 * H * hd))
    dheld = dq.new_empty(batch, held, 2 * H * hd)
    dbias, dthrough = (dq.new_empty(BW, M if read is not None else 0) for _ in range(2))
    dscores, keys, values = (_array(t) for t in read) if read is not None else (_NO_READ,) * 3
    _launch(_backward_kernel, _array(dq), _array(dkeys), _array(dvalues), _array(flat), _array(cos), _array(sin),
            segments, M, dproj.numpy().reshape(BW * S, 3, H, hd), dheld.numpy().reshape(batch * held, 2, H, hd),
            dscores, keys, values, dbias.numpy(), dthrough.numpy())
    return (dproj, dheld) if read is None else (dproj, dheld, dbias, dthrough)


_NO_READ = np.empty((0, 0, 0, 0), np.float32)  # `kept_rows_backward`'s scores, keys and values without a read


def rotated_qkv_forward(proj: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj [B, T, 3 H hd] float32 (a q|k|v projection), cos, sin [T, hd] -> q, k rotated and v [B, H, T, hd],
    contiguous."""
    B, T, _ = proj.shape
    hd = cos.shape[1]
    q, k, v = (proj.new_empty(B, heads, T, hd) for _ in range(3))
    _launch(_qkv_forward_kernel, _array(proj).reshape(B, T, 3, heads, hd), _array(cos), _array(sin),
            q.numpy(), k.numpy(), v.numpy())
    return q, k, v


def rotated_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> torch.Tensor:
    """The gradients of `rotated_qkv_forward`'s outputs [B, H, T, hd] -> that of its proj [B, T, 3 H hd]."""
    B, H, T, hd = dq.shape
    dproj = dq.new_empty(B, T, 3, H, hd)
    _launch(_qkv_backward_kernel, _array(dq), _array(dk), _array(dv), _array(cos), _array(sin), dproj.numpy())
    return dproj.view(B, T, 3 * H * hd)


def _prefix_grads(dscores, dk, k, dv, v, dbias, dthrough):
    """dscores [B, H, Lq, Lk] a read's score gradients, dk, k, dv, v [B, H, Lk, d] its keys and values and their
    gradients -> writes, over its first Lb keys, dbias [B, Lb] = sum_{h, i} dscores and dthrough [B, Lb] =
    sum_{h, e} (dk k + dv v)."""
    for b in prange(dscores.shape[0]):
        _prefix_sums(dscores[b], dk[b], k[b], dv[b], v[b], dbias[b], dthrough[b])


_prefix_grads_kernel = compiled(_prefix_grads, fastmath=True, parallel=True)


def prefix_grads(dscores: torch.Tensor, dk: torch.Tensor, k: torch.Tensor, dv: torch.Tensor, v: torch.Tensor,
                 prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix read's gradients of its key bias and of its keys' straight-through weight (`ltm_core.attention`'s
    `_prefix_grads`, whose PyTorch ops are the reference): dscores [B, H, Lq, Lk], dk, k, dv, v [B, H, Lk, d] float32
    -> (sum over heads and queries of the first `prefix` keys' score gradients, sum over heads and dims of dk k + dv v
    on those keys), [B, prefix] each."""
    B = dscores.shape[0]
    dbias, dthrough = (dscores.new_empty(B, prefix) for _ in range(2))
    _launch(_prefix_grads_kernel, *(_array(t) for t in (dscores, dk, k, dv, v)), dbias.numpy(), dthrough.numpy())
    return dbias, dthrough


def _conv_forward(x, before, w, residual, y):
    """x [B, T, C], before [B, K - 1, C] the inputs before x, w [C, K] -> writes y [B, T, C] (plus x if `residual`).
    The taps read from a [K, C] copy of w (contiguous over the channels the loops run along: 3x faster), in float32."""
    B, T, C = y.shape
    K = w.shape[1]
    K1 = K - 1
    wt = np.ascontiguousarray(w.T)  # [K, C]
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        out, xt = y[b, t], x[b, t]
        for c in range(C):
            out[c] = xt[c] if residual else np.float32(0.0)
        for k in range(K):
            p = t + k  # in [before; x]
            row = before[b, p] if p < K1 else x[b, p - K1]
            wk = wt[k]
            for c in range(C):
                out[c] += wk[c] * row[c]


def _conv_backward(dy, x, before, w, residual, starts, dx, dbefore, dw):
    """dy [B, T, C], x [B, T, C], before [B, K - 1, C], w [C, K], starts [T] (or empty: one window) the first token
    of each output's gradient window -> writes dx [B, T, C] (plus dy if `residual`), dbefore [B, K - 1, C] and dw [C,
    K] (summed over WEIGHT_BLOCKS blocks of rows apart, then the blocks in order). An input before its output's
    window passes that output no gradient (it reads it detached); the weight takes every tap's. As the forward, the
    taps from a [K, C] copy of w, in float32."""
    B, T, C = dy.shape
    K = w.shape[1]
    K1 = K - 1
    n = WEIGHT_BLOCKS
    cut = starts.shape[0] > 0
    wt = np.ascontiguousarray(w.T)  # [K, C]
    dw_parts = np.empty((n, K, C), np.float32)
    for bi in prange(B * T):  # x's rows (row i + K1 of [before; x]); one loop per destination: 3x faster than one
        b, i = bi // T, bi % T  # over [before; x] choosing its destination row
        out = dx[b, i]
        if residual:
            dyi = dy[b, i]
            for c in range(C):
                out[c] = dyi[c]
        else:
            for c in range(C):
                out[c] = np.float32(0.0)
        for k in range(K):
            t = i + K1 - k
            if t < T and not (cut and i < starts[t]):
                wk, dyt = wt[k], dy[b, t]
                for c in range(C):
                    out[c] += wk[c] * dyt[c]
    for bj in range(B * K1):  # before's rows (the inputs before x: window 0's)
        b, j = bj // K1, bj % K1
        out = dbefore[b, j]
        for c in range(C):
            out[c] = np.float32(0.0)
        for k in range(K):
            t = j - k
            if 0 <= t < T and not (cut and 0 < starts[t]):
                wk, dyt = wt[k], dy[b, t]
                for c in range(C):
                    out[c] += wk[c] * dyt[c]
    for p in prange(n):  # block p of the B T output rows
        part = dw_parts[p]
        for k in range(K):
            for c in range(C):
                part[k, c] = np.float32(0.0)
        for bt in range(p * B * T // n, (p + 1) * B * T // n):
            b, t = bt // T, bt % T
            dyt = dy[b, t]
            for k in range(K):
                q = t + k
                row = before[b, q] if q < K1 else x[b, q - K1]
                pk = part[k]
                for c in range(C):
                    pk[c] += dyt[c] * row[c]
    for c in range(C):
        for k in range(K):
            acc = np.float32(0.0)
            for p in range(n):
                acc += dw_parts[p, k, c]
            dw[c, k] = acc


_conv_forward_kernel = compiled(_conv_forward, fastmath=True, parallel=True)
_conv_backward_kernel = compiled(_conv_backward, fastmath=True, parallel=True)


def causal_conv_forward(x: torch.Tensor, before: torch.Tensor, weight: torch.Tensor, residual: bool) -> torch.Tensor:
    """x [B, ..., C] (its T tokens in order), before [B, K - 1, C] the inputs before x, weight [C, K], float32 -> y
    shaped as x: the causal depthwise convolution of [before; x] (plus x if `residual`), read in place (no
    concatenated copy; NumPy reshapes the tokens, no PyTorch view)."""
    B, C = x.shape[0], x.shape[-1]
    y = x.new_empty(x.shape)
    _launch(_conv_forward_kernel, _array(x).reshape(B, -1, C), _array(before), _weight(weight), residual,
            y.numpy().reshape(B, -1, C))
    return y


def causal_conv_backward(dy: torch.Tensor, x: torch.Tensor, before: torch.Tensor, weight: torch.Tensor, residual: bool,
                         starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of `causal_conv_forward`'s output -> those of its x, before and weight; starts [T] int64 (or
    empty) the first token of each token's gradient window: an input passes no gradient to a later window's outputs."""
    B, C = x.shape[0], x.shape[-1]
    dx, dbefore, dw = torch.empty_like(x), torch.empty_like(before), weight.new_empty(weight.shape)
    _launch(_conv_backward_kernel, _array(dy).reshape(B, -1, C), _array(x).reshape(B, -1, C), _array(before),
            _weight(weight), residual, starts, dx.numpy().reshape(B, -1, C), dbefore.numpy(), dw.numpy())
    return dx, dbefore, dw


NO_CUTS = np.empty(0, np.int64)  # `causal_conv_backward`'s starts for one gradient window


def _rms_forward(x, w, eps, y, rstd):
    """x [N, C], w [C] -> writes y [N, C] = x / rms(x) * w and rstd [N] = 1 / rms(x) (rms over each row, eps inside).
    In float32 throughout, as PyTorch's op: a float64 sum or factor makes every element convert, and took 4x the time
    on two threads."""
    N, C = x.shape
    inv_c, eps32 = np.float32(1.0 / C), np.float32(eps)
    for n in prange(N):
        xn, yn = x[n], y[n]
        acc = np.float32(0.0)
        for c in range(C):
            acc += xn[c] * xn[c]
        r = np.float32(1.0) / np.sqrt(acc * inv_c + eps32)
        rstd[n] = r
        for c in range(C):
            yn[c] = xn[c] * r * w[c]


def _rms_backward(dy, x, w, rstd, dx, dw):
    """The gradient dy [N, C] of `_rms_forward`'s y -> writes dx [N, C] = r (g - xhat mean(g xhat)) with xhat = x r,
    g = dy w, and dw [C] = sum dy xhat (over WEIGHT_BLOCKS blocks of rows apart, then the blocks in order); in
    float32, as the forward."""
    N, C = x.shape
    inv_c = np.float32(1.0 / C)
    for n in prange(N):
        xn, dyn, dxn = x[n], dy[n], dx[n]
        r = rstd[n]
        acc = np.float32(0.0)
        for c in range(C):
            acc += dyn[c] * w[c] * xn[c]
        m = acc * r * r * inv_c  # mean(g xhat) / r
        for c in range(C):
            dxn[c] = r * (dyn[c] * w[c] - xn[c] * m)
    parts = WEIGHT_BLOCKS
    dw_parts = np.empty((parts, C), np.float32)
    for p in prange(parts):
        part = dw_parts[p]
        for c in range(C):
            part[c] = np.float32(0.0)
        for n in range(p * N // parts, (p + 1) * N // parts):
            r = rstd[n]
            xn, dyn = x[n], dy[n]
            for c in range(C):
                part[c] += dyn[c] * xn[c] * r
    _sum_blocks(dw_parts, dw)


_rms_forward_kernel = compiled(_rms_forward, fastmath=True, parallel=True)
_rms_backward_kernel = compiled(_rms_backward, fastmath=True, parallel=True)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] (N rows), weight [C] float32 -> (x / rms(x) * weight, shaped as x, each row's 1 / rms [N])
    (`ltm_core.ops.rms_norm`, whose PyTorch op is the reference). The rows are NumPy's reshapes: no PyTorch view
    (each is an operator, and one more autograd node, between the model's large ops)."""
    C = x.shape[-1]
    y, rstd = x.new_empty(x.shape), x.new_empty(x.numel() // C)
    _launch(_rms_forward_kernel, _array(x).reshape(-1, C), _weight(weight), float(eps), y.numpy().reshape(-1, C),
            rstd.numpy())
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of `rms_norm_forward`'s output [..., C] -> those of its x (shaped as x) and weight [C]."""
    C = x.shape[-1]
    dx, dw = torch.empty_like(x), weight.new_empty(weight.shape)
    _launch(_rms_backward_kernel, _array(dy).reshape(-1, C), _array(x).reshape(-1, C), _weight(weight), _array(rstd),
            dx.numpy().reshape(-1, C), dw.numpy())
    return dx, dw


REASSOCIATE = {"reassoc", "contract"}  # the loop's floating-point freedom: sums in a vectorised order (the same for
# every call), fused multiply-adds; NaN and infinity keep their meaning


def _choose(state, entries, weight, bias, noise, tau, vacant, S):
    """The tokens memory's writes (`ltm_core.memory.choice`, whose module docstring states the steps; see `choose`
    there for the arguments) -> (held [B, W + 1, M], keeps [B, W, M], held_empty [B, W + 1, M], ranks [B, P]: every
    pool row's importance w . x + b in float64, before noise)."""
    B, M, C = state.shape
    P = M + entries.shape[1]  # the pool: [state; entries]
    W = (P - M) // S
    N = M + S
    ranks = np.empty((B, P), np.float64)
    empty = np.empty((B, P), np.bool_)
    for b in range(B):  # each row's rank, in float64 from its entries alone, and whether it is all zeros
        for p in range(P):
            row = state[b, p] if p < M else entries[b, p - M]
            acc = 0.0
            for c in range(C):  # compiled with reassociation: a vectorised sum, in one fixed order for every row
                acc += np.float64(row[c]) * np.float64(weight[c])
            ranks[b, p] = acc + np.float64(bias[0])
            filled = False
            for c in range(C):
                if row[c] != 0:
                    filled = True
                    break
            empty[b, p] = not filled
    held = np.empty((B, W + 1, M), np.int64)
    keeps = np.empty((B, W, M), np.int64)
    held_empty = np.empty((B, W + 1, M), np.bool_)
    cand = np.empty(N, np.int64)
    rank = np.empty(N, np.float64)
    order = np.empty(M, np.int64)
    for b in range(B):
        for j in range(M):
            held[b, 0, j] = j
            held_empty[b, 0, j] = empty[b, j]
        for i in range(W):
            for j in range(M):
                cand[j] = held[b, i, j]
            for j in range(S):
                cand[M + j] = M + i * S + j
            for j in range(N):
                rank[j] = ranks[b, cand[j]]
            if tau > 0:
                mean = 0.0
                for j in range(N):
                    mean += rank[j]
                mean /= N
                var = 0.0
                for j in range(N):
                    var += (rank[j] - mean) ** 2
                scale = tau * np.sqrt(var / (N - 1))
                for j in range(N):  # a standard Gumbel sample from each exponential one
                    rank[j] = rank[j] + scale * -np.log(np.float64(noise[i, b, j]))
            for j in range(M):  # only held candidates can be empty slots
                if empty[b, cand[j]]:
                    rank[j] = rank[j] - vacant
            # the M best in candidate order, ties to the earlier candidate: the M-th highest rank by a partial
            # partition, then one pass in order (ranks with a NaN, a diverged model's: a stable sort ranking NaN last)
            nan = False  # (a loop: np.isnan(rank).any() allocated an array per write)
            for j in range(N):
                if rank[j] != rank[j]:
                    nan = True
                    break
            if nan:  # order written in place: rebinding it to the sort's array slowed every write (the call ~1.6x)
                order[:] = np.sort(np.argsort(-rank, kind="mergesort")[:M])
            else:
                threshold = np.partition(rank, N - M)[N - M]
                ties = M  # how many of the candidates equal to the threshold are kept, the earliest
                for j in range(N):
                    if rank[j] > threshold:
                        ties -= 1
                k = 0
                for j in range(N):
                    if rank[j] > threshold or (rank[j] == threshold and ties > 0):
                        if rank[j] == threshold:
                            ties -= 1
                        order[k] = j
                        k += 1
            for j in range(M):
                keeps[b, i, j] = order[j]
                held[b, i + 1, j] = cand[order[j]]
                held_empty[b, i + 1, j] = empty[b, held[b, i + 1, j]]
    return held, keeps, held_empty, ranks


def _window_rows(held, first, window, starts, M, G, P):
    """The bookkeeping of a scan over G BPTT windows (`ltm_core.memory.choice.window_rows`: see there) of a pool of P
    rows -> (own [B, W + 1, M], rows [B, W, M], later [B, U]): the tokens held at a later window's start, each once
    (ascending; U the most of any batch row, the others padded with pool row 0), so the read projects each once."""
    B, W1, _ = held.shape
    own = np.empty((B, W1, M), np.bool_)
    rows = np.empty((B, W1 - 1, M), np.int64)
    marked = np.zeros((B, P), np.bool_)
    count = np.zeros(B, np.int64)
    for b in range(B):
        for i in range(W1):
            for j in range(M):
                own[b, i, j] = window[i] == 0 or held[b, i, j] >= first[i]
        for g in range(1, G):
            for j in range(M):
                row = held[b, starts[g], j]
                if row >= M and not marked[b, row]:  # a scanned token (the state's rows come first as they are)
                    marked[b, row] = True
                    count[b] += 1
    U = count.max() if B else 0
    later = np.zeros((B, U), np.int64)
    place = np.empty(P, np.int64)  # each pool row's place among [the state's M rows; later]
    for b in range(B):
        k = 0
        for row in range(P):
            if row < M:
                place[row] = row
            elif marked[b, row]:
                later[b, k] = row
                place[row] = M + k
                k += 1
        for i in range(W1 - 1):
            for j in range(M):
                row = held[b, i, j]
                # a token of the segment's own window (after the M + U rows), or one held since a window's start
                rows[b, i, j] = row + U if row >= first[i] else place[row]
    return own, rows, later


choose_loop = compiled(_choose, fastmath=REASSOCIATE)  # the loops, also called from the scan's forward pass below
window_rows_loop = compiled(_window_rows)


def _scan_forward(state, entries, w, bias, noise, tau, vacant, first, window, starts, segment, penalty,
                  read_importance, empty_score, sig, prefix_bias, through, after, aux):
    """A scan over the pool [state; entries], its choices included, in one call: state [B, M, C] the rows held
    before the scan, entries [B, W S, C] the W segments of S = `segment` tokens; w [C], bias [1]; noise, tau, vacant:
    the writes' (`_choose`); first, window [W + 1], starts [G]: the BPTT windows' layout (`_window_rows`) -> the
    choices (held [B, W + 1, M] the pool rows held before each segment and after the last, keeps [B, W, M], own
    [B, W + 1, M], rows [B, W, M]: `_choose`'s and `_window_rows`' serial loops; row_tokens [B, M + U, C] the
    tokens those rows name below M + U: the state, then the U tokens held at a later window's start, each once),
    and writes sig [B, P] = sigmoid(z), z = pool . w + bias (for backward); each segment's read prefix, prefix_bias
    [B W, M] = `empty_score` on empty slots (+ log sigmoid(z) with `read_importance`) and through [B W, M] =
    sigmoid(z); after [B, M, C] the rows held after the last segment; aux [W] = `penalty` * the mean sigmoid(z) of
    each segment's B S tokens (0 without one)."""
    B, M, C = state.shape
    P = M + entries.shape[1]
    S, G = segment, starts.shape[0]
    held, keeps, empty, ranks = choose_loop(state, entries, w, bias, noise, tau, vacant, S)
    own, rows, later = window_rows_loop(held, first, window, starts, M, G, P)
    W, U = held.shape[1] - 1, later.shape[1]
    logsig = np.empty((B, P), np.float32)  # each row's, once
    for bp in prange(B * P):
        b, p = bp // P, bp % P
        zz = np.float64(np.float32(ranks[b, p]))  # z: the loop's rank, rounded to float32 as the reference's
        e = np.exp(-abs(zz))
        sig[b, p] = 1.0 / (1.0 + e) if zz >= 0 else e / (1.0 + e)
        logsig[b, p] = min(zz, 0.0) - np.log1p(e)  # log sigmoid(z), without overflow
    for bw in prange(B * W):
        b, i = bw // W, bw % W
        for m in range(M):
            r = held[b, i, m]
            through[bw, m] = sig[b, r]
            score = empty_score if empty[b, i, m] else np.float32(0.0)
            if read_importance:
                score += logsig[b, r]
            prefix_bias[bw, m] = score
    row_tokens = np.empty((B, M + U, C), np.float32)
    for bm in prange(B * M):
        b, m = bm // M, bm % M
        r = held[b, W, m]
        row = state[b, r] if r < M else entries[b, r - M]
        for c in range(C):
            after[b, m, c] = row[c]
            row_tokens[b, m, c] = state[b, m, c]
    for bu in prange(B * U):
        b, u = bu // U, bu % U
        r = later[b, u]
        row = state[b, r] if r < M else entries[b, r - M]
        for c in range(C):
            row_tokens[b, M + u, c] = row[c]
    for i in range(W):
        acc = 0.0
        if penalty != 0.0:
            for b in range(B):
                for t in range(S):
                    acc += sig[b, M + i * S + t]
        aux[i] = penalty * acc / (B * S)
    return held, keeps, own, rows, row_tokens


def _scan_backward(state, entries, w, sig, held, own, dprefix_bias, dthrough, dafter, daux, drow_tokens, segment,
                   penalty, detach, read_importance, dstate, dentries, dw, db):
    """The gradients of `_scan_forward`'s prefix_bias, through [B W, M], after [B, M, C], aux [W] and row_tokens
    [B, M + U, C] (its state rows: the later windows' are detached) -> writes dstate [B, M, C], dentries [B, W S, C]
    and the weight's and bias's gradients dw [C], db [1] (summed over WEIGHT_BLOCKS blocks of rows apart, then the
    blocks in order). A held row marked `own` [B, W + 1, M] gives its gradient to its pool row and to w, b; the
    others (held over from an earlier BPTT window) to w, b only; so do the penalty's tokens under `detach`."""
    B, M, C = state.shape
    P = M + entries.shape[1]
    W, S = held.shape[1] - 1, segment
    gz_own, gz_cut = np.zeros((B, P), np.float64), np.zeros((B, P), np.float64)
    n = WEIGHT_BLOCKS
    dw_parts, db_parts = np.empty((n, C), np.float32), np.empty(n, np.float32)
    for b in range(B):  # one thread: rows are held by many segments
        for i in range(W):
            for m in range(M):
                r = held[b, i, m]
                s = np.float64(sig[b, r])
                g = dthrough[b * W + i, m] * s * (1.0 - s)  # d sigmoid
                if read_importance:
                    g += dprefix_bias[b * W + i, m] * (1.0 - s)  # d log sigmoid
                if own[b, i, m]:
                    gz_own[b, r] += g
                else:
                    gz_cut[b, r] += g
        if penalty != 0.0:
            for i in range(W):
                scale = daux[i] * penalty / (B * S)
                for t in range(S):
                    p = M + i * S + t
                    s = np.float64(sig[b, p])
                    if detach:
                        gz_cut[b, p] += scale * s * (1.0 - s)
                    else:
                        gz_own[b, p] += scale * s * (1.0 - s)
    for bp in prange(B * P):
        b, p = bp // P, bp % P
        g = np.float32(gz_own[b, p])
        if p < M:
            for c in range(C):
                dstate[b, p, c] = g * w[c]
            if drow_tokens.shape[0]:  # (empty: none)
                for c in range(C):
                    dstate[b, p, c] += drow_tokens[b, p, c]
        else:
            for c in range(C):
                dentries[b, p - M, c] = g * w[c]
    for b in range(B if dafter.shape[0] else 0):  # (empty: none)
        for m in range(M):
            r = held[b, W, m]
            if own[b, W, m]:
                drow = dstate[b, r] if r < M else dentries[b, r - M]
                for c in range(C):
                    drow[c] += dafter[b, m, c]
    for k in prange(n):  # block k of the B P rows
        for c in range(C):
            dw_parts[k, c] = 0.0
        db_parts[k] = 0.0
        for bp in range(k * B * P // n, (k + 1) * B * P // n):
            b, p = bp // P, bp % P
            g = np.float32(gz_own[b, p] + gz_cut[b, p])
            db_parts[k] += g
            row = state[b, p] if p < M else entries[b, p - M]
            for c in range(C):
                dw_parts[k, c] += g * row[c]
    _sum_blocks(dw_parts, dw)
    _sum_blocks(db_parts.reshape(n, 1), db)


_scan_forward_kernel = compiled(_scan_forward, fastmath=True, parallel=True)
_scan_backward_kernel = compiled(_scan_backward, fastmath=True, parallel=True)


def scan_forward(state: torch.Tensor, entries: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 noise: tuple[np.ndarray, float], vacant: float, layout: tuple[np.ndarray, np.ndarray, np.ndarray],
                 segment: int, penalty: float, read_importance: bool, empty_score: float) -> tuple[torch.Tensor, ...]:
    """The tokens memory's scan with its choices (`ltm_core.memory.tokens`' `_CompiledScan`, whose PyTorch ops in
    `TokensMemory` are the reference; see `_scan_forward`): state [B, M, C] and entries [B, W S, C] float32, the
    importance's weight [C] and bias [1], noise: the writes' (samples, tau) (`choice.gumbel_source`), layout: the
    BPTT windows' (`choice.window_layout`) -> (held [B, W + 1, M], keeps [B, W, M], own [B, W + 1, M], rows [B, W,
    M]; sig [B, M + W S] each pool row's sigmoid(z), prefix_bias, through [B W, M], after [B, M, C], aux [W],
    row_tokens [B, M + U, C])."""
    B, M, C = state.shape
    W = entries.shape[1] // segment
    sig = state.new_empty(B, M + entries.shape[1])
    prefix_bias, through = (state.new_empty(B * W, M) for _ in range(2))
    after, aux = state.new_empty(B, M, C), state.new_empty(W)
    choices = _launch(_scan_forward_kernel, _array(state), _array(entries), _weight(weight), _weight(bias), *noise,
                      float(vacant), *layout, segment, float(penalty), read_importance, np.float32(empty_score),
                      sig.numpy(), prefix_bias.numpy(), through.numpy(), after.numpy(), aux.numpy())
    held, keeps, own, rows, row_tokens = (torch.from_numpy(a) for a in choices)
    return held, keeps, own, rows, sig, prefix_bias, through, after, aux, row_tokens


def scan_backward(state: torch.Tensor, entries: torch.Tensor, weight: torch.Tensor, sig: torch.Tensor,
                  held: torch.Tensor, own: torch.Tensor, dprefix_bias: torch.Tensor, dthrough: torch.Tensor,
                  dafter: Optional[torch.Tensor], daux: torch.Tensor, drow_tokens: Optional[torch.Tensor], segment: int,
                  penalty: float, detach: bool, read_importance: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `scan_forward`'s prefix_bias, through, after, aux and row_tokens (after's and row_tokens'
    may be None: none), from its sig (own [B, W + 1, M] bool: which held rows pass their gradient to the pool, else
    to the weight and bias only) -> those of state [B, M, C], entries [B, W S, C], weight [C] and bias [1]."""
    C = state.shape[2]
    dafter, drow_tokens = (_NO_ROWS if t is None else _array(t) for t in (dafter, drow_tokens))
    dstate, dentries = torch.empty_like(state), torch.empty_like(entries)
    dw, db = weight.new_empty(C), weight.new_empty(1)
    _launch(_scan_backward_kernel, _array(state), _array(entries), _weight(weight), _array(sig), _array(held),
            _array(own), _array(dprefix_bias), _array(dthrough), dafter, _array(daux), drow_tokens,
            segment, float(penalty), detach, read_importance, dstate.numpy(), dentries.numpy(), dw.numpy(),
            db.numpy())
    return dstate, dentries, dw, db


_NO_ROWS = np.empty((0, 0, 0), np.float32)  # a gradient the scan's backward does not get (its kernel skips it)


def _rows(t: torch.Tensor, chunks: int, heads: int, head_dim: int):
    """t [B, n, chunks H hd] -> its values as a NumPy array [B n, chunks, H, hd] (no copy when contiguous)."""
    return _array(t).reshape(-1, chunks, heads, head_dim)


def _array(t: torch.Tensor) -> np.ndarray:
    """t's values as a NumPy array, without a copy when t is contiguous. Between the model's large ops every PyTorch
    call costs several microseconds: one conversion, detaching a tensor that requires a gradient itself."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy(force=t.requires_grad)  # (forced: the values, detached, without a dispatched detach of our own)


def _weight(t: torch.Tensor) -> np.ndarray:
    """A parameter's values (or a view of one's) as a NumPy array of their own: a NumPy view of a tensor marks its
    storage as not resizable for good, and FSDP2 frees the unsharded parameters by resizing their storage to 0. The
    weights the passes read are small (C or C x K floats): the copy costs less than a call."""
    return t.detach().clone().numpy()
