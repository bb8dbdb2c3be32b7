"""The tokens memory's writes on CPU as one compiled loop (Numba).

A write keeps the M best of M + S candidates (the memory's M entries, then the segment's S tokens); a window's W
writes follow one another, each from the entries the previous one kept. In PyTorch every write is a dozen ops on
vectors of M + S numbers (`TokensMemory.choose`, the reference), and on CPU their dispatch costs more than their
arithmetic: with this loop the `model=tiny` training step at 8K took 0.935x the time, `small`'s 0.973x
(`scripts/bench_overrides.py`, docs/benchmarks.md). Numba compiles it on first use (cached on disk after that).

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


REASSOCIATE = {"reassoc", "contract"}  # the loop's floating-point freedom: sums in a vectorised order (the same for
# every call), fused multiply-adds; NaN and infinity keep their meaning


def _choose(state, entries, weight, bias, noise, tau, vacant, S):
    """The loop (compiled by `choose` on first use): see `choose` for the arguments."""
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
    return held, keeps, held_empty


def _window_rows(held, first, window, starts, M, G):
    """The bookkeeping of a scan over G BPTT windows (compiled by `window_rows` on first use): see there."""
    B, W1, _ = held.shape
    own = np.empty((B, W1, M), np.bool_)
    rows = np.empty((B, W1 - 1, M), np.int64)
    for b in range(B):
        for i in range(W1):
            for j in range(M):
                own[b, i, j] = window[i] == 0 or held[b, i, j] >= first[i]
        for i in range(W1 - 1):
            g = window[i]
            k = 0  # where the next held-over row sits among the rows held at the window's start (both ascending)
            for j in range(M):
                row = held[b, i, j]
                if row >= first[i]:  # a token of the segment's own window
                    rows[b, i, j] = row - M + G * M
                else:
                    while k < M and held[b, starts[g], k] < row:
                        k += 1
                    rows[b, i, j] = g * M + k
    return own, rows


_kernel = None  # the compiled `_choose`
_rows_kernel = None  # the compiled `_window_rows`


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
    global _kernel
    if _kernel is None:
        from ltm_core.cpu_kernels import compiled

        _kernel = compiled(_choose, fastmath=REASSOCIATE)
    samples, scale = (np.ones((0, 0, 0), np.float32), 0.0) if noise is None else (_numpy_float(noise), float(tau))
    held, keeps, empty = _kernel(_numpy_float(state), _numpy_float(entries), _numpy_float(weight),
                                 _numpy_float(bias), samples, scale, float(vacant), segment)
    return torch.from_numpy(held), torch.from_numpy(keeps), torch.from_numpy(empty)


def _numpy_float(t: torch.Tensor) -> np.ndarray:
    """A float tensor's values as a NumPy array (`cpu_kernels._array`: no copy for contiguous float32 / float64 on
    CPU; NumPy has no bfloat16)."""
    from ltm_core.cpu_kernels import _array

    return _array(t if t.dtype in (torch.float32, torch.float64) else t.detach().float())


def window_rows(held: torch.Tensor, slots: int, segment: int, windows: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bookkeeping of a scan over BPTT windows of `windows` segments (`TokensMemory.scan_windows`; its PyTorch
    form is the reference): held [B, W + 1, M] the pool rows held before each segment and after the last (ascending;
    the pool: the M = `slots` rows held before the scan, then the segments of S = `segment` tokens) -> (own [B, W + 1,
    M] bool: the rows each memory reads with their gradient (its window's own tokens; everything in the first
    window), rows [B, W, M] int64: each held row's place in [the M rows held at each window's start, G M rows; the
    scanned tokens])."""
    global _rows_kernel
    if _rows_kernel is None:
        from ltm_core.cpu_kernels import compiled

        _rows_kernel = compiled(_window_rows)
    first, window, starts = window_layout(windows, slots, segment)
    own, rows = _rows_kernel(held.contiguous().numpy(), first, window, starts, slots, len(windows))
    return torch.from_numpy(own), torch.from_numpy(rows)


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
