"""The tokens memory's writes on CPU as one compiled loop (Numba).

A write keeps the M best of M + S candidates (the memory's M entries, then the segment's S tokens); a window's W
writes follow one another, each from the entries the previous one kept. In PyTorch every write is a dozen ops on
vectors of M + S numbers (`TokensMemory.choose`, the reference), and on CPU their dispatch costs more than their
arithmetic: with this loop the `model=tiny` training step at 8K took 0.935x the time, `small`'s 0.973x
(`scripts/bench_overrides.py`, docs/benchmarks.md). The loop is `ltm_core.cpu_kernels._choose` (compiled on first
use, cached on disk after that), beside the scan's forward pass that calls it for the layer-major path; this module
calls it for single writes and states its steps.

The same steps as the reference, from the same pool and exponential samples:

    rank  = w . x + b of the candidates x, in float64                [M + S]
    rank += tau * std(rank) * -log(noise)       (training noise, Gumbel samples; std unbiased, as torch.std)
    rank -= VACANT_RANK for held candidates that are empty slots
    keep  = the M highest, in candidate order

Ties go to the earlier candidate (the M-th highest rank found by a partial partition, then the candidates taken in
order); PyTorch's `topk` breaks them in no stated order, so the two agree on everything but which of several equal
candidates is kept (equal ranks: empty slots, or identical tokens without noise, whose kept rows hold the same values
either way). A rank that is NaN (a diverged model) loses to every number here, where `topk` ranks it highest. The
ranks and the noise's spread are summed in another order than PyTorch's (vectorised: the loop is compiled with
reassociation, one fixed order for every row and call, so a write and a window's scan rank a token alike), and NumPy's
log is not PyTorch's, so they may differ in the last bit (a choice could differ only between two candidates whose
ranks are that close). The ranks, empty-slot flags and Gumbel samples are made here, in one pass over the pool, not
as PyTorch ops between the model's large ones, where each small op costs more in cold caches than in arithmetic.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch


def choose(state: torch.Tensor, entries: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
           noise: Optional[torch.Tensor], tau: float, vacant: float, segment: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The W writes of a pool [state; entries]: state [B, M, C] the M entries held before the first write, entries
    [B, W S, C] the W segments of S = `segment` tokens, in order; ranked by weight [C] and bias [1] (the importance
    w . x + b, in float64; an all-zero row is an empty slot, whose rank loses `vacant` while held), noise [W, B,
    M + S] the writes' standard exponential samples (the Gumbel samples are their -log) or None, tau the noise scale
    -> (held [B, W + 1, M]: the pool rows held before each write and after the last, keeps [B, W, M]: each write's
    kept candidates, indices into [held; segment], int64; empty [B, W + 1, M] bool: which held rows are empty
    slots), CPU tensors."""
    from ltm_core.cpu_kernels import choose_loop

    samples, scale = gumbel_source(noise, tau)
    held, keeps, empty, _ = choose_loop(_numpy_float(state), _numpy_float(entries), _numpy_float(weight),
                                        _numpy_float(bias), samples, scale, float(vacant), segment)
    return torch.from_numpy(held), torch.from_numpy(keeps), torch.from_numpy(empty)


def gumbel_source(noise: Optional[torch.Tensor], tau: float) -> tuple[np.ndarray, float]:
    """The loop's noise arguments: (the exponential samples [W, B, M + S] as a NumPy array, tau), or (an empty
    array, 0) without noise."""
    return (np.ones((0, 0, 0), np.float32), 0.0) if noise is None else (_numpy_float(noise), float(tau))


def _numpy_float(t: torch.Tensor) -> np.ndarray:
    """A float tensor's values as a NumPy array (`cpu_kernels._array`: no copy for contiguous float32 / float64 on
    CPU; NumPy has no bfloat16)."""
    from ltm_core.cpu_kernels import _array

    return _array(t if t.dtype in (torch.float32, torch.float64) else t.detach().float())


def window_rows(held: torch.Tensor, slots: int, segment: int, windows: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bookkeeping of a scan over BPTT windows of `windows` segments (`TokensMemory.scan_windows`; its PyTorch
    form is the reference): held [B, W + 1, M] the pool rows held before each segment and after the last (ascending;
    the pool: the M = `slots` rows held before the scan, then the segments of S = `segment` tokens) -> (own [B, W + 1,
    M] bool: the rows each memory reads with their gradient (its window's own tokens; everything in the first
    window), rows [B, W, M] int64: each held row's place in [the M rows held before the scan; the U tokens of later
    [B, U]; the scanned tokens], later: the scanned tokens held at a later window's start, each once, ascending
    (where the reference lists the rows held at each later window's start, (G - 1) M, the same token as often as it
    is held), so the read projects each once)."""
    from ltm_core.cpu_kernels import window_rows_loop

    first, window, starts = window_layout(windows, slots, segment)
    pool = slots + (held.shape[1] - 1) * segment
    own, rows, later = window_rows_loop(held.contiguous().numpy(), first, window, starts, slots, len(windows), pool)
    return torch.from_numpy(own), torch.from_numpy(rows), torch.from_numpy(later)


@functools.lru_cache(maxsize=64)
def window_layout(windows: tuple[int, ...], slots: int, segment: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the first pool row of each segment's window [W + 1], each segment's window [W + 1], each window's first
    segment [G]), made once per layout (read-only): between a pass's large tensor ops these few NumPy calls ran many
    times slower than in a loop of their own (cold caches)."""
    G = len(windows)
    starts = np.cumsum((0,) + tuple(windows[:-1]))  # [G] each window's first segment
    window = np.append(np.repeat(np.arange(G), windows), G - 1)  # [W + 1]: the state after the last segment counts
    # in the last window
    first = slots + starts[window] * segment  # [W + 1]
    for a in (first, window, starts):
        a.flags.writeable = False
    return first, window, starts
