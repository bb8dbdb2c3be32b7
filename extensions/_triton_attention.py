"""FlashAttention-2 style forward and backward in Triton, with the memory-prefix / causal / window mask.

Key layout (see `ltm_core.attention`): keys [0, prefix_len) are the memory prefix, visible to every query; keys
[prefix_len, Lk) are the segment, whose last Lq positions are the queries. A query i has segment position
qpos = i + (seg_len - Lq); segment key kpos is visible iff (not causal or kpos <= qpos) and
(no window or kpos > qpos - window).

Forward: one program per (query block, batch*head); one online softmax, first over the prefix blocks (never
masked but for the tail), then over the segment blocks that can be visible to the query block (blocks entirely
above the diagonal or left of the window are never visited). The logsumexp (base 2) is saved. An optional bias
[B, prefix_len] adds to the prefix keys' scores (every head and query; the tokens memory's importance), with its
gradient summed over the queries in the dK/dV kernel (per head; the host sums the heads).
Backward: delta = rowsum(dO * O); one kernel for dK/dV (one program per key block, looping over the query blocks
that can see it) and one for dQ (one program per query block, looping like the forward). No atomics.

This module imports triton at top level: it is only imported lazily, from the triton path of the dispatcher.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._backend import interpreting, next_pow2

LOG2E = 1.4426950408889634


# (BLOCK_M, BLOCK_N, num_warps, num_stages) on CUDA: the default fits every dtype and head dim; the tuned candidates
# are autotuned per shape key. (32, 64, 8, *) for dK/dV spill least at head dim 128 in bf16: 0-8 stack bytes
# against 248-1800 for the other candidates (`python -m ltm_extensions.aot --head-dim 128 --configs all`, Triton 3.9).
CUDA_CONFIGS = {
    "fwd": {"default": (64, 64, 4, 2),
            "tuned": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]},
    "kv": {"default": (32, 64, 4, 2),
           "tuned": [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (32, 64, 8, 3), (32, 64, 8, 2)]},
    "q": {"default": (64, 32, 4, 2),
          "tuned": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]},
}


def cuda_configs(kind: str) -> list[tuple[int, int, int, int]]:
    """The CUDA candidates of kernel `kind` (fwd | kv | q): tuned + default, or the default alone with
    LTM_TRITON_AUTOTUNE=0."""
    default = CUDA_CONFIGS[kind]["default"]
    if os.environ.get("LTM_TRITON_AUTOTUNE", "1") == "0":
        return [default]
    return CUDA_CONFIGS[kind]["tuned"] + [default]


def _configs(kind: str) -> list:
    """Autotune candidates. Under the interpreter / without CUDA: one small config (fast tests); on CUDA
    `cuda_configs(kind)`."""
    if interpreting() or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in cuda_configs(kind)]


def _prune(configs, nargs, **kwargs):
    """fp32 tiles are twice as large: drop the configs whose shared memory cannot fit (the default always stays)."""
    q = nargs.get("Q", kwargs.get("Q"))
    block_d = kwargs.get("BLOCK_D", nargs.get("BLOCK_D", 64))
    if q is None or q.element_size() < 4 or block_d < 64:
        return configs
    max_tile = 4096 if block_d >= 128 else 8192
    keep = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile
            and (block_d < 128 or c.num_stages <= 2)]
    return keep or configs[-1:]


_PRUNE = {"early_config_prune": _prune}


_KEY = ["LQ_KEY", "LK_KEY", "BLOCK_D", "CAUSAL", "HAS_WINDOW", "HAS_BIAS", "DOT_PREC"]


# ----------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, offs_n, kv_mask_d, key_valid, qpos, qk_scale, window,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SEGMENT: tl.constexpr, HAS_BIAS: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """One key block of the online softmax. offs_n: key index (prefix) or segment position (segment); bias_ptrs:
    the keys' score bias in base 2 (HAS_BIAS, prefix blocks only)."""
    kmask = key_valid[:, None] & kv_mask_d
    k = tl.load(k_ptrs, mask=kmask, other=0.0)
    v = tl.load(v_ptrs, mask=kmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], base-2 logits
    if HAS_BIAS:
        s = s + tl.load(bias_ptrs, mask=key_valid, other=0.0)[None, :]
    visible = key_valid[None, :]
    if SEGMENT:
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > qpos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.autotune(configs=_configs("fwd"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, BIAS,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, sbb, sbn,
              H, Lq, Lk, prefix_len, window, qk_scale, LQ_KEY, LK_KEY,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    O += off_b * sob + off_h * soh
    BIAS += off_b * sbb
    LSE += pid_bh.to(tl.int64) * Lq

    seg_len = Lk - prefix_len
    seg_off = seg_len - Lq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < Lq
    d_valid = offs_d < HEAD_DIM
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=row_valid[:, None] & d_valid[None, :],
                other=0.0)
    qpos = offs_m + seg_off

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_mask_d = d_valid[None, :]

    # memory prefix: visible to every query
    for start_n in range(0, prefix_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q,
            K + offs_n[:, None] * skn + offs_d[None, :] * skd,
            V + offs_n[:, None] * svn + offs_d[None, :] * svd,
            BIAS + offs_n * sbn,
            offs_n, kv_mask_d, offs_n < prefix_len, qpos, qk_scale, window,
            CAUSAL, HAS_WINDOW, False, HAS_BIAS, DOT_PREC)

    # segment: only the key positions some query of this block can see
    qpos_lo = m0 + seg_off
    qpos_hi = tl.minimum(m0 + BLOCK_M, Lq) - 1 + seg_off
    lo = 0
    hi = seg_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seg_len, qpos_hi + 1), 0)
    if HAS_WINDOW:
        lo = tl.minimum(tl.maximum(qpos_lo - window + 1, 0), hi)
    Ks = K + prefix_len * skn
    Vs = V + prefix_len * svn
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q,
            Ks + offs_n[:, None] * skn + offs_d[None, :] * skd,
            Vs + offs_n[:, None] * svn + offs_d[None, :] * svd,
            BIAS,
            offs_n, kv_mask_d, offs_n < hi, qpos, qk_scale, window,
            CAUSAL, HAS_WINDOW, True, False, DOT_PREC)

    empty = l_i == 0.0  # fully masked row: output 0, lse +inf (so the backward's p is 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + offs_m, lse, mask=row_valid)
    tl.store(O + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=row_valid[:, None] & d_valid[None, :])


# ----------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Lq,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _bwd_kv_block(dk, dv, db, k, v, bias, Q, DO, LSE, DELTA, offs_m, offs_d, d_valid, kpos, key_valid, Lq, seg_off,
                  qk_scale, window, sqm, sqd, sdm, sdd,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SEGMENT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """One query block's share of a key block's dK, dV and (HAS_BIAS) its bias gradient db [BN]; bias: the key
    block's score bias in base 2 [BN]."""
    row_valid = offs_m < Lq
    qmask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=qmask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_valid, other=float("inf"))
    delta = tl.load(DELTA + offs_m, mask=row_valid, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
    if HAS_BIAS:
        st = st + bias[:, None]
    visible = key_valid[:, None] & row_valid[None, :]
    if SEGMENT:
        qpos = offs_m + seg_off
        if CAUSAL:
            visible = visible & (kpos[:, None] <= qpos[None, :])
        if HAS_WINDOW:
            visible = visible & (kpos[:, None] > qpos[None, :] - window)
    pt = tl.where(visible, tl.math.exp2(st - lse[None, :]), 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM]
    dst = pt * (dpt - delta[None, :])  # the scores' gradient (natural units)
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    if HAS_BIAS:
        db += tl.sum(dst, 1)
    return dk, dv, db


@triton.autotune(configs=_configs("kv"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_kv(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, DB,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd, sbb, sbn,
                 H, Lq, Lk, prefix_len, window, qk_scale, sm_scale, LQ_KEY, LK_KEY,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # key blocks never straddle the prefix/segment boundary: first cdiv(prefix_len, BN) prefix blocks, then
    # the segment blocks
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    DO += off_b * sdb + off_h * sdh
    DK += pid_bh.to(tl.int64) * Lk * HEAD_DIM
    DV += pid_bh.to(tl.int64) * Lk * HEAD_DIM
    BIAS += off_b * sbb
    DB += pid_bh.to(tl.int64) * prefix_len
    LSE += pid_bh.to(tl.int64) * Lq
    DELTA += pid_bh.to(tl.int64) * Lq

    seg_len = Lk - prefix_len
    seg_off = seg_len - Lq
    n_prefix_blocks = tl.cdiv(prefix_len, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)

    if pid_n < n_prefix_blocks:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = offs_n < prefix_len
        kmask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kmask, other=0.0)
        bias = db
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_n * sbn, mask=key_valid, other=0.0)
        for start_m in range(0, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            dk, dv, db = _bwd_kv_block(dk, dv, db, k, v, bias, Q, DO, LSE, DELTA, offs_m, offs_d, d_valid, offs_n,
                                       key_valid, Lq, seg_off, qk_scale, window, sqm, sqd, sdm, sdd,
                                       CAUSAL, HAS_WINDOW, False, HAS_BIAS, DOT_PREC)
        if HAS_BIAS:
            tl.store(DB + offs_n, db, mask=key_valid)
    else:
        kpos = (pid_n - n_prefix_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # segment positions
        offs_n = prefix_len + kpos
        key_valid = kpos < seg_len
        kmask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kmask, other=0.0)
        kpos_lo = (pid_n - n_prefix_blocks) * BLOCK_N
        kpos_hi = tl.minimum(kpos_lo + BLOCK_N, seg_len) - 1
        m_lo = 0
        m_hi = Lq
        if CAUSAL:  # query i sees kpos iff i + seg_off >= kpos
            m_lo = tl.minimum(tl.maximum(kpos_lo - seg_off, 0), Lq)
        if HAS_WINDOW:  # ... and i + seg_off < kpos + window
            m_hi = tl.maximum(tl.minimum(kpos_hi + window - seg_off, Lq), m_lo)
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            dk, dv, db = _bwd_kv_block(dk, dv, db, k, v, db, Q, DO, LSE, DELTA, offs_m, offs_d, d_valid, kpos,
                                       key_valid, m_hi, seg_off, qk_scale, window, sqm, sqd, sdm, sdd,
                                       CAUSAL, HAS_WINDOW, True, False, DOT_PREC)

    out_mask = key_valid[:, None] & d_valid[None, :]
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_q_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, offs_n, kv_mask_d, key_valid, qpos, qk_scale,
                 window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SEGMENT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    kmask = key_valid[:, None] & kv_mask_d
    k = tl.load(k_ptrs, mask=kmask, other=0.0)
    v = tl.load(v_ptrs, mask=kmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:
        s = s + tl.load(bias_ptrs, mask=key_valid, other=0.0)[None, :]
    visible = key_valid[None, :]
    if SEGMENT:
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > qpos[:, None] - window)
    p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_configs("q"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_q(Q, K, V, DO, LSE, DELTA, DQ, BIAS,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd, sbb, sbn,
                H, Lq, Lk, prefix_len, window, qk_scale, sm_scale, LQ_KEY, LK_KEY,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    DO += off_b * sdb + off_h * sdh
    DQ += pid_bh.to(tl.int64) * Lq * HEAD_DIM
    BIAS += off_b * sbb
    LSE += pid_bh.to(tl.int64) * Lq
    DELTA += pid_bh.to(tl.int64) * Lq

    seg_len = Lk - prefix_len
    seg_off = seg_len - Lq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < Lq
    d_valid = offs_d < HEAD_DIM
    qmask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=qmask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_valid, other=float("inf"))
    delta = tl.load(DELTA + offs_m, mask=row_valid, other=0.0)
    qpos = offs_m + seg_off
    kv_mask_d = d_valid[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, prefix_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        dq = _bwd_q_block(dq, q, do, lse, delta,
                          K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                          V + offs_n[:, None] * svn + offs_d[None, :] * svd,
                          BIAS + offs_n * sbn,
                          offs_n, kv_mask_d, offs_n < prefix_len, qpos, qk_scale, window,
                          CAUSAL, HAS_WINDOW, False, HAS_BIAS, DOT_PREC)

    qpos_lo = m0 + seg_off
    qpos_hi = tl.minimum(m0 + BLOCK_M, Lq) - 1 + seg_off
    lo = 0
    hi = seg_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seg_len, qpos_hi + 1), 0)
    if HAS_WINDOW:
        lo = tl.minimum(tl.maximum(qpos_lo - window + 1, 0), hi)
    Ks = K + prefix_len * skn
    Vs = V + prefix_len * svn
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        dq = _bwd_q_block(dq, q, do, lse, delta,
                          Ks + offs_n[:, None] * skn + offs_d[None, :] * skd,
                          Vs + offs_n[:, None] * svn + offs_d[None, :] * svd,
                          BIAS,
                          offs_n, kv_mask_d, offs_n < hi, qpos, qk_scale, window,
                          CAUSAL, HAS_WINDOW, True, False, DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)


# ----------------------------------------------------------------------------------------------------------------
# host side


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"  # fp32 inputs: exact fp32 products unless the user allowed TF32
    return "tf32"  # ignored for fp16/bf16 inputs


def _common(q, k, window):
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    block_d = max(16, next_pow2(d))
    return B, H, Lq, Lk, d, block_d, dict(
        LQ_KEY=next_pow2(Lq), LK_KEY=next_pow2(Lk), HEAD_DIM=d, BLOCK_D=block_d,
        HAS_WINDOW=window is not None, DOT_PREC=_dot_precision(q.dtype))


def _bias_args(bias, dummy):
    """The bias pointer and strides: bias [B, prefix_len] as base-2 fp32 logits, or a dummy pointer."""
    if bias is None:
        return dummy, (0, 0)
    return bias, bias.stride()


def attn_forward(q, k, v, causal: bool, prefix_len: int, window, scale: float, bias=None):
    """bias: None or [B, prefix_len] fp32 in base 2 (the score bias times log2(e): `FlashAttentionTriton`)."""
    B, H, Lq, Lk, d, block_d, meta = _common(q, k, window)
    o = torch.empty((B, H, Lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    bias_ptr, bias_strides = _bias_args(bias, lse)
    grid = lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](q, k, v, o, lse, bias_ptr, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *bias_strides,
                    H, Lq, Lk, prefix_len, 0 if window is None else int(window), scale * LOG2E,
                    CAUSAL=bool(causal), HAS_BIAS=bias is not None, **meta)
    return o, lse


def attn_backward(do, q, k, v, o, lse, causal: bool, prefix_len: int, window, scale: float, bias=None):
    """-> dq, dk, dv and the bias gradient [B, prefix_len] (fp32, natural units; None without a bias)."""
    B, H, Lq, Lk, d, block_d, meta = _common(q, k, window)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    bm = 32 if interpreting() else 64
    _bwd_delta[(triton.cdiv(Lq, bm), B * H)](o, do, delta, *o.stride(), *do.stride(), H, Lq,
                                             HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm)
    dq = torch.empty((B, H, Lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Lk, d), dtype=v.dtype, device=v.device)
    db = None if bias is None else torch.empty((B, H, prefix_len), dtype=torch.float32, device=q.device)  # per head
    bias_ptr, bias_strides = _bias_args(bias, delta)
    seg_len = Lk - prefix_len
    args = (H, Lq, Lk, prefix_len, 0 if window is None else int(window), scale * LOG2E, scale)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *bias_strides)
    grid_kv = lambda META: (triton.cdiv(prefix_len, META["BLOCK_N"]) + triton.cdiv(seg_len, META["BLOCK_N"]),  # noqa
                            B * H)
    _attn_bwd_kv[grid_kv](q, k, v, do, lse, delta, dk, dv, bias_ptr, delta if db is None else db, *strides, *args,
                          CAUSAL=bool(causal), HAS_BIAS=bias is not None, **meta)
    grid_q = lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_q[grid_q](q, k, v, do, lse, delta, dq, bias_ptr, *strides, *args, CAUSAL=bool(causal),
                        HAS_BIAS=bias is not None, **meta)
    return dq, dk, dv, None if db is None else db.sum(dim=1)


class FlashAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, causal: bool, prefix_len: int, window, scale: float):
        bias2 = None if bias is None else (bias.float() * LOG2E).contiguous()  # base-2 logits, as the scores
        o, lse = attn_forward(q, k, v, causal, prefix_len, window, scale, bias2)
        ctx.save_for_backward(q, k, v, o, lse, bias2)
        ctx.args = (causal, prefix_len, window, scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, bias2 = ctx.saved_tensors
        dq, dk, dv, dbias = attn_backward(do, q, k, v, o, lse, *ctx.args, bias2)
        return dq, dk, dv, None if dbias is None else dbias.to(ctx.bias_dtype), None, None, None, None


def flash_attention_triton(q, k, v, causal: bool, prefix_len: int, window, scale: float, bias=None):
    return FlashAttentionTriton.apply(q, k, v, bias, causal, prefix_len, window, scale)
