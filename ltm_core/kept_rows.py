"""The window read's keys and values on CPU as one compiled pass (Numba), forward and backward.

`_KeptKeysValues` (ltm_core/model.py) turns the q|k|v projection of [the tokens held at each window's start; the
pass's segments] into the read's inputs: rotated queries, and for every segment [its kept tokens' keys; its own keys
rotated] and the same of the values. In PyTorch that is a dozen strided copies and rotations, each writing a
temporary (the rotation alone three), whose backward adds a dozen more; here each direction is one pass over the
rows, split over segments between as many threads as PyTorch's. The PyTorch ops in `_KeptKeysValues` are the
reference, and the path for half precision, GPUs, torch.compile and forked processes (where OpenMP threads hang);
`tests/memory/test_tokens.py` checks that the two agree. `model=tiny`'s training step at 8K takes 0.93x the time
with this pass (docs/benchmarks.md).

    forward:   q[s]       = rotate(q row s)                        per segment, head
               keys[:M]   = k rows of the kept tokens;  keys[M:]   = rotate(k rows of the segment)
               values[:M] = v rows of the kept tokens;  values[M:] = v rows of the segment
    backward:  the rows' gradient = the inverse rotations of dq and the segment's dkeys, its dvalues, and every
               segment's dkeys / dvalues of its kept tokens added to their rows (the held tokens' q gradient is 0)

The rotation is `ltm_core.layers.apply_rotary`'s: y = x * [cos, cos] + [x2, x1] * [-sin, sin] over a head's halves.
"""

from __future__ import annotations

import numba
import torch
from numba import prange

from ltm_core.memory.choice import compiled


def _forward(proj, flat, cos, sin, held, segments, q, keys, values):
    """proj [B P, 3, H, hd] the q|k|v rows (P = `held` + `segments` S per batch element), flat [B W M] each segment's
    kept rows (into B P), cos, sin [S, hd] -> writes q [B W, H, S, hd], keys, values [B W, H, M + S, hd]."""
    BW, H, S, hd = q.shape
    M = keys.shape[2] - S
    P = held + segments * S
    half = hd // 2
    for bw in prange(BW):  # one segment per iteration, split between the threads
        b, w = bw // segments, bw % segments
        for h in range(H):
            for m in range(M):
                r = flat[bw * M + m]
                for d in range(hd):
                    keys[bw, h, m, d] = proj[r, 1, h, d]
                    values[bw, h, m, d] = proj[r, 2, h, d]
            for s in range(S):
                row = b * P + held + w * S + s
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


def _backward(dq, dkeys, dvalues, flat, cos, sin, held, segments, dproj):
    """The gradients of `_forward`'s outputs -> writes dproj [B P, 3, H, hd], the gradient of its proj."""
    BW, H, S, hd = dq.shape
    M = dkeys.shape[2] - S
    P = held + segments * S
    half = hd // 2
    for r in prange(dproj.shape[0] // P * held):  # the held tokens' rows: only what the kept rows add
        b, i = r // held, r % held
        for j in range(3):
            for h in range(H):
                for d in range(hd):
                    dproj[b * P + i, j, h, d] = 0.0
    for bw in prange(BW):
        b, w = bw // segments, bw % segments
        for s in range(S):
            row = b * P + held + w * S + s
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
            for h in range(H):
                for d in range(hd):
                    dproj[r, 1, h, d] += dkeys[bw, h, m, d]
                    dproj[r, 2, h, d] += dvalues[bw, h, m, d]


_forward_kernel = compiled(_forward, fastmath=True, parallel=True)
_backward_kernel = compiled(_backward, fastmath=True, parallel=True)


def _threads() -> None:
    """Numba's threads for the next call: as many as PyTorch's (`torch.set_num_threads`), within Numba's pool."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def forward(proj: torch.Tensor, flat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, held: int, segments: int,
            heads: int, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj [B, P, 3 H hd] float32 (P = `held` + `segments` S), flat [B W M] the kept rows (`layers.flat_rows`),
    cos, sin [S, hd] -> q [B W, H, S, hd], keys, values [B W, H, M + S, hd], contiguous."""
    B, P, _ = proj.shape
    S, hd = cos.shape
    BW, M = B * segments, slots
    q = proj.new_empty(BW, heads, S, hd)
    keys, values = (proj.new_empty(BW, heads, M + S, hd) for _ in range(2))
    _threads()
    _forward_kernel(proj.detach().contiguous().view(B * P, 3, heads, hd).numpy(), flat.numpy(), cos.numpy(),
                    sin.numpy(), held, segments, q.numpy(), keys.numpy(), values.numpy())
    return q, keys, values


def backward(dq: torch.Tensor, dkeys: torch.Tensor, dvalues: torch.Tensor, flat: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, held: int, segments: int, batch: int) -> torch.Tensor:
    """The gradients of `forward`'s outputs -> that of its proj [B, P, 3 H hd]."""
    BW, H, S, hd = dq.shape
    P = held + segments * S
    dproj = dq.new_empty(batch * P, 3, H, hd)
    _threads()
    _backward_kernel(dq.contiguous().numpy(), dkeys.contiguous().numpy(), dvalues.contiguous().numpy(), flat.numpy(),
                     cos.numpy(), sin.numpy(), held, segments, dproj.numpy())
    return dproj.view(batch, P, 3 * H * hd)
