"""The window read's keys and values on CPU as one compiled pass (Numba), forward and backward.

`_KeptKeysValues` (ltm_core/model.py) turns the q|k|v projection of the pass's segments and the k|v projection of
the tokens held at each window's start into the read's inputs: rotated queries, and for every segment [its kept
tokens' keys; its own keys rotated] and the same of the values. In PyTorch that is a dozen strided copies and rotations, each writing a
temporary (the rotation alone three), whose backward adds a dozen more; here each direction is one pass over the
rows, split over segments between as many threads as PyTorch's. The PyTorch ops in `_KeptKeysValues` are the
reference, and the path for half precision, GPUs, torch.compile and forked processes (where OpenMP threads hang);
`tests/memory/test_tokens.py` checks that the two agree. `model=tiny`'s training step at 8K takes 0.93x the time
with this pass (docs/benchmarks.md).

    forward:   q[s]       = rotate(q row s)                        per segment, head
               keys[:M]   = k rows of the kept tokens;  keys[M:]   = rotate(k rows of the segment)
               values[:M] = v rows of the kept tokens;  values[M:] = v rows of the segment
    backward:  the rows' gradient = the inverse rotations of dq and the segment's dkeys, its dvalues, and every
               segment's dkeys / dvalues of its kept tokens added to their rows (held or segment rows)

The rotation is `ltm_core.layers.apply_rotary`'s: y = x * [cos, cos] + [x2, x1] * [-sin, sin] over a head's halves.
"""

from __future__ import annotations

import numba
import torch
from numba import prange

from ltm_core.memory.choice import compiled


def _forward(proj, held, flat, cos, sin, segments, q, keys, values):
    """proj [B W S, 3, H, hd] the segments' q|k|v rows, held [B R, 2, H, hd] the held tokens' k|v rows, flat [B W M]
    each segment's kept rows (into the B pools [held; segments] of P = R + W S rows), cos, sin [S, hd] -> writes
    q [B W, H, S, hd], keys, values [B W, H, M + S, hd]."""
    BW, H, S, hd = q.shape
    M = keys.shape[2] - S
    B = BW // segments
    R = held.shape[0] // B
    P = R + segments * S
    half = hd // 2
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
                for d in range(half):
                    c1, s1, c2, s2 = cos[s, d], sin[s, d], cos[s, d + half], sin[s, d + half]
                    x1, x2 = proj[row, 0, h, d], proj[row, 0, h, d + half]
                    q[bw, h, s, d] = x1 * c1 + x2 * s1
                    q[bw, h, s, d + half] = x2 * c2 + x1 * s2
                    x1, x2 = proj[row, 1, h, d], proj[row, 1, h, d + half]
                    keys[bw, h, M + s, d] = x1 * c1 + x2 * s1
                    keys[bw, h, M + s, d + half] = x2 * c2 + x1 * s2
                for d in range(hd):
                    values[bw, h, M + s, d] = proj[row, 2, h, d]


def _backward(dq, dkeys, dvalues, flat, cos, sin, segments, dproj, dheld):
    """The gradients of `_forward`'s outputs -> writes dproj [B W S, 3, H, hd] and dheld [B R, 2, H, hd], those of
    its proj and held."""
    BW, H, S, hd = dq.shape
    M = dkeys.shape[2] - S
    B = BW // segments
    R = dheld.shape[0] // B
    P = R + segments * S
    half = hd // 2
    for r in prange(dheld.shape[0]):  # the held tokens' rows: only what the kept rows add
        for j in range(2):
            for h in range(H):
                for d in range(hd):
                    dheld[r, j, h, d] = 0.0
    for bw in prange(BW):
        for s in range(S):
            row = bw * S + s
            for h in range(H):
                for d in range(half):  # y1 = x1 c1 + x2 s1, y2 = x2 c2 + x1 s2
                    c1, s1, c2, s2 = cos[s, d], sin[s, d], cos[s, d + half], sin[s, d + half]
                    g1, g2 = dq[bw, h, s, d], dq[bw, h, s, d + half]
                    dproj[row, 0, h, d] = g1 * c1 + g2 * s2
                    dproj[row, 0, h, d + half] = g1 * s1 + g2 * c2
                    g1, g2 = dkeys[bw, h, M + s, d], dkeys[bw, h, M + s, d + half]
                    dproj[row, 1, h, d] = g1 * c1 + g2 * s2
                    dproj[row, 1, h, d + half] = g1 * s1 + g2 * c2
                for d in range(hd):
                    dproj[row, 2, h, d] = dvalues[bw, h, M + s, d]
    for bw in range(BW):  # one thread: segments keep rows in common
        for m in range(M):
            r = flat[bw * M + m]
            b, i = r // P, r % P
            for h in range(H):
                if i < R:
                    for d in range(hd):
                        dheld[b * R + i, 0, h, d] += dkeys[bw, h, m, d]
                        dheld[b * R + i, 1, h, d] += dvalues[bw, h, m, d]
                else:
                    row = b * segments * S + i - R
                    for d in range(hd):
                        dproj[row, 1, h, d] += dkeys[bw, h, m, d]
                        dproj[row, 2, h, d] += dvalues[bw, h, m, d]


_forward_kernel = compiled(_forward, fastmath=True, parallel=True)
_backward_kernel = compiled(_backward, fastmath=True, parallel=True)


def _threads() -> None:
    """Numba's threads for the next call: as many as PyTorch's (`torch.set_num_threads`), within Numba's pool."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def forward(proj: torch.Tensor, held: torch.Tensor, flat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            segments: int, heads: int, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj [B, W S, 3 H hd] and held [B, R, 2 H hd] float32, flat [B W M] the kept rows of [held; segments]
    (`layers.flat_rows`), cos, sin [S, hd] -> q [B W, H, S, hd], keys, values [B W, H, M + S, hd], contiguous."""
    B, R, _ = held.shape
    S, hd = cos.shape
    BW, M = B * segments, slots
    q = proj.new_empty(BW, heads, S, hd)
    keys, values = (proj.new_empty(BW, heads, M + S, hd) for _ in range(2))
    _threads()
    _forward_kernel(_rows(proj, 3, heads, hd), _rows(held, 2, heads, hd), flat.numpy(), cos.numpy(), sin.numpy(),
                    segments, q.numpy(), keys.numpy(), values.numpy())
    return q, keys, values


def backward(dq: torch.Tensor, dkeys: torch.Tensor, dvalues: torch.Tensor, flat: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, held: int, segments: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `forward`'s outputs (`held`: its R) -> those of its proj [B, W S, 3 H hd] and held [B, R,
    2 H hd]."""
    BW, H, S, hd = dq.shape
    dproj = dq.new_empty(BW * S, 3, H, hd)
    dheld = dq.new_empty(batch * held, 2, H, hd)
    _threads()
    _backward_kernel(dq.contiguous().numpy(), dkeys.contiguous().numpy(), dvalues.contiguous().numpy(), flat.numpy(),
                     cos.numpy(), sin.numpy(), segments, dproj.numpy(), dheld.numpy())
    return dproj.view(batch, -1, 3 * H * hd), dheld.view(batch, held, 2 * H * hd)


def _rows(t: torch.Tensor, chunks: int, heads: int, head_dim: int):
    """t [B, n, chunks H hd] -> its values as a NumPy array [B n, chunks, H, hd] (no copy when contiguous)."""
    return t.detach().contiguous().view(-1, chunks, heads, head_dim).numpy()
