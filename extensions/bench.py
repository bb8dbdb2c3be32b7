"""Kernel benchmarks (library functions; `ltm bench kernels` renders them).

`bench_kernels(device, dtype)` times forward and backward of every kernel for each implementation:
  - "triton": the Triton kernel (CUDA only);
  - "torch_ref": the plain-PyTorch reference;
  - "sdpa" (attention): `F.scaled_dot_product_attention`, `is_causal=True` in the plain causal case, an explicit
    boolean mask otherwise;
  - "flex" (attention, cases with a memory prefix): `torch.nn.attention.flex_attention` with a block mask from the
    same rule (compiled on CUDA, eager elsewhere); a failure is reported in the row's "error" instead of times.
The reference is skipped on CUDA where its fp32 scores would exceed `REF_MAX_SCORES` elements.
Times are medians in ms (`median_ms`: on CUDA `triton.testing.do_bench`, L2 flushed between calls). Attention rows
report TFLOP/s (4·B·H·d·visible pairs forward, 2.5x that backward); the other kernels report GB/s (bytes read +
written). `pct_peak` relates the forward
throughput to the measured peak (`measure_peaks`: bf16 matmul TFLOP/s and device copy GB/s).
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ._backend import triton_importable
from .reference import attention_mask, with_key_bias

ROW_KEYS = ("kernel", "case", "impl", "dtype", "device", "fwd_ms", "bwd_ms", "tflops_fwd", "tflops_bwd",
            "gbps_fwd", "gbps_bwd", "pct_peak", "error")

# plain causal at 4K-16K with 16K tokens per batch (the FlashAttention papers' setting), prefix + causal at the
# head dims of a large and of the base model (prefix = memory slots), the base model's tokens-memory read as the
# model runs it (`key_bias`: a learned score bias on the prefix keys; the Triton kernel and FlexAttention add it to
# the scores, SDPA gets it folded into a 65th head dim, `reference.with_key_bias`, as the model does; this row
# decides `kernels=auto`'s prefix choice), a window case and the memory cross-read
DEFAULT_SHAPES_CUDA: dict[str, list[dict[str, Any]]] = {
    "flash_attention": [
        dict(B=4, H=16, Lq=4096, Lk=4096, d=128, causal=True, prefix_len=0, window=None),
        dict(B=2, H=16, Lq=8192, Lk=8192, d=128, causal=True, prefix_len=0, window=None),
        dict(B=1, H=16, Lq=16384, Lk=16384, d=128, causal=True, prefix_len=0, window=None),
        dict(B=4, H=16, Lq=4096, Lk=4096 + 512, d=128, causal=True, prefix_len=512, window=None),
        dict(B=16, H=12, Lq=512, Lk=512 + 512, d=64, causal=True, prefix_len=512, window=None),
        dict(B=16, H=12, Lq=512, Lk=512 + 512, d=64, causal=True, prefix_len=512, window=None, key_bias=True),
        dict(B=2, H=16, Lq=8192, Lk=8192, d=128, causal=True, prefix_len=0, window=1024),
        dict(B=16, H=12, Lq=512, Lk=64, d=64, causal=False, prefix_len=0, window=None),
    ],
    "rms_norm": [dict(rows=16384, N=8192, residual=False), dict(rows=16384, N=8192, residual=True)],
    "swiglu": [dict(rows=16384, N=8192)],
    "memory_update": [dict(B=256, M=512, D=1024)],
    "compress_gate": [dict(B=64, T=4096, D=1024)],
}

# the plain-PyTorch attention reference materialises fp32 scores [B, H, Lq, Lk] (several copies in backward):
# it is skipped above this many score elements (4 GiB per copy)
REF_MAX_SCORES = 1 << 30

DEFAULT_SHAPES_CPU: dict[str, list[dict[str, Any]]] = {
    "flash_attention": [
        dict(B=1, H=4, Lq=256, Lk=256, d=64, causal=True, prefix_len=0, window=None),
        dict(B=1, H=4, Lq=256, Lk=256 + 16, d=64, causal=True, prefix_len=16, window=64),
    ],
    "rms_norm": [dict(rows=1024, N=512, residual=True)],
    "swiglu": [dict(rows=1024, N=1024)],
    "memory_update": [dict(B=8, M=64, D=256)],
    "compress_gate": [dict(B=4, T=256, D=256)],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of fn() in ms. CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls,
    warm-up and repeats chosen by time: 25 ms and 100 ms); elsewhere: `warmup` calls, then `repeats` timed ones."""
    if device.type == "cuda" and triton_importable():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_peaks(device: torch.device | str, *, size: Optional[int] = None, warmup: int = 2,
                  repeats: int = 5) -> dict[str, float]:
    """Measured bf16 matmul TFLOP/s and copy GB/s (read + write) on `device`."""
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.matmul(a, b), device, warmup, repeats)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    numel = (256 << 20) if device.type == "cuda" else (8 << 20)  # elements of fp32
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup, repeats)
    gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    return {"matmul_tflops_bf16": tflops, "copy_gbps": gbps}


def _row(kernel: str, case: str, impl: str, dtype: torch.dtype, device: torch.device, **kw) -> dict[str, Any]:
    row = {k: None for k in ROW_KEYS}
    row.update(kernel=kernel, case=case, impl=impl, dtype=str(dtype).replace("torch.", ""), device=str(device))
    row.update(kw)
    return row


def _time_fwd_bwd(fwd: Callable[..., Any], inputs: list[torch.Tensor], device: torch.device, warmup: int,
                  repeats: int) -> tuple[float, Optional[float], Optional[str]]:
    """Median ms of `fwd(*inputs)` on detached inputs, and of the backward (autograd.grad of one retained graph).

    A failing forward raises; a failing backward gives (fwd_ms, None, error string).
    """
    detached = [t.detach() for t in inputs]
    with torch.no_grad():
        fwd_ms = median_ms(lambda: fwd(*detached), device, warmup, repeats)
    try:
        with torch.enable_grad():
            out = fwd(*inputs)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            grads = [torch.randn_like(o) for o in outs]
            bwd = lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)  # noqa: E731
            bwd_ms = median_ms(bwd, device, warmup, repeats)
    except Exception as e:
        return fwd_ms, None, "backward: " + _err(e)
    return fwd_ms, bwd_ms, None


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def _impls_for(device: torch.device) -> list[str]:
    impls = ["torch_ref"]
    if device.type == "cuda" and triton_importable():
        impls.insert(0, "triton")
    return impls


# ----------------------------------------------------------------------------------------------------------------
# attention


def _flex_fn(s: dict[str, Any], device: torch.device, compile_flex: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lq, lk, prefix_len, causal, window = s["Lq"], s["Lk"], s["prefix_len"], s["causal"], s["window"]
    seg_off = lk - prefix_len - lq

    def mask_mod(b, h, q_idx, kv_idx):
        kpos = kv_idx - prefix_len
        qpos = q_idx + seg_off
        visible = kpos >= kpos  # all True, as a tensor
        if causal:
            visible = visible & (kpos <= qpos)
        if window is not None:
            visible = visible & (kpos > qpos - window)
        return visible | (kpos < 0)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=lq, KV_LEN=lk, device=str(device))
    attend = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
    current = {}  # the call's key bias: one score_mod for every call, so the compiled kernel is reused

    def add_bias(score, b, h, q_idx, kv_idx):  # the prefix keys' score bias (kv_idx < prefix_len), with its gradient
        bias = current["bias"]
        return score + torch.where(kv_idx < prefix_len, bias[b, torch.clamp(kv_idx, max=prefix_len - 1)], 0.0)

    def run(q, k, v, bias=None):
        current["bias"] = bias
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # eager: "called without torch.compile()": known, intended
            return attend(q, k, v, score_mod=None if bias is None else add_bias, block_mask=block_mask)

    return run


def _sdpa_folded(q, k, v, bias, mask):
    """SDPA with a score bias on the first bias.shape[1] keys folded into one more head dim (`with_key_bias`, as
    `ltm_core.attention` runs it), at the original head dim's scale; -> [B, H, Lq, d]."""
    d = q.shape[-1]
    return F.scaled_dot_product_attention(*with_key_bias(q, k, v, bias), attn_mask=mask, scale=d ** -0.5)[..., :d]


def _bench_attention(s: dict[str, Any], device, dtype, impls, peaks, warmup, repeats, compile_flex):
    from . import flash_attention

    B, H, lq, lk, d = s["B"], s["H"], s["Lq"], s["Lk"], s["d"]
    causal, prefix_len, window = s["causal"], s["prefix_len"], s["window"]  # defaults filled by bench_kernels
    case = f"{'causal' if causal else 'full'} Lq={lq} Lk={lk} d={d} B={B} H={H}"
    if prefix_len:
        case += f" prefix={prefix_len}"
    if window is not None:
        case += f" window={window}"
    if s["key_bias"]:
        case += " key_bias"
    mask = attention_mask(lq, lk, causal=causal, prefix_len=prefix_len, window=window, device=device)
    visible = int(mask.sum().item())
    flops_fwd = 4.0 * B * H * d * visible
    flops_bwd = 2.5 * flops_fwd
    q = torch.randn(B, H, lq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, lk, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, lk, d, device=device, dtype=dtype, requires_grad=True)
    inputs = [q, k, v]
    if s["key_bias"]:  # [B, prefix_len], as the tokens memory's read bias (fp32)
        inputs.append(torch.randn(B, prefix_len, device=device, requires_grad=True))
    plain = prefix_len == 0 and window is None and (lq == lk or not causal)
    scores = B * H * lq * lk

    rows = []
    # FlexAttention (compiled per shape on CUDA) is the comparison for the memory prefix, where SDPA needs a mask
    others = ["sdpa", "flex"] if prefix_len else ["sdpa"]
    for impl in list(impls) + others:
        if impl == "torch_ref" and device.type == "cuda" and scores > REF_MAX_SCORES:
            rows.append(_row("flash_attention", case, impl, dtype, device,
                             error=f"skipped: fp32 scores of {scores * 4 / 2**30:.0f} GiB"))
            continue
        try:
            if impl in ("triton", "torch_ref"):
                backend = "triton" if impl == "triton" else "torch"
                fwd = lambda q, k, v, bias=None: flash_attention(  # noqa: E731
                    q, k, v, causal=causal, prefix_len=prefix_len, window=window, backend=backend, key_bias=bias)
            elif impl == "sdpa":
                if s["key_bias"]:
                    fwd = lambda q, k, v, bias: _sdpa_folded(q, k, v, bias, mask)  # noqa: E731
                elif plain:
                    fwd = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                else:
                    fwd = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
            else:
                fwd = _flex_fn(s, device, compile_flex)
            fwd_ms, bwd_ms, error = _time_fwd_bwd(fwd, inputs, device, warmup, repeats)
        except Exception as e:  # report, keep benchmarking the others
            rows.append(_row("flash_attention", case, impl, dtype, device, error=_err(e)))
            continue
        extra = {}
        if impl == "triton" and device.type == "cuda":  # the launch configs the autotuner chose for this shape
            from . import _triton_attention as ta

            extra["config"] = {name: str(getattr(kernel, "best_config", None)) for name, kernel in
                               (("fwd", ta._attn_fwd), ("kv", ta._attn_bwd_kv), ("q", ta._attn_bwd_q))}
        tf_fwd = flops_fwd / (fwd_ms * 1e-3) / 1e12
        tf_bwd = None if bwd_ms is None else flops_bwd / (bwd_ms * 1e-3) / 1e12
        pct = 100.0 * tf_fwd / peaks["matmul_tflops_bf16"] if peaks.get("matmul_tflops_bf16") else None
        rows.append(_row("flash_attention", case, impl, dtype, device, fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                         tflops_fwd=tf_fwd, tflops_bwd=tf_bwd, pct_peak=pct, error=error, **extra))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# elementwise / norm kernels


def _bench_memory_bound(kernel: str, case: str, make_fwd: Callable[[str], Callable[..., Any]],
                        inputs: list[torch.Tensor], bytes_fwd: int, bytes_bwd: int, device, dtype, impls, peaks,
                        warmup, repeats):
    rows = []
    for impl in impls:
        try:
            fwd = make_fwd("triton" if impl == "triton" else "torch")
            fwd_ms, bwd_ms, error = _time_fwd_bwd(fwd, inputs, device, warmup, repeats)
        except Exception as e:
            rows.append(_row(kernel, case, impl, dtype, device, error=_err(e)))
            continue
        gb_fwd = bytes_fwd / (fwd_ms * 1e-3) / 1e9
        gb_bwd = None if bwd_ms is None else bytes_bwd / (bwd_ms * 1e-3) / 1e9
        pct = 100.0 * gb_fwd / peaks["copy_gbps"] if peaks.get("copy_gbps") else None
        rows.append(_row(kernel, case, impl, dtype, device, fwd_ms=fwd_ms, bwd_ms=bwd_ms, gbps_fwd=gb_fwd,
                         gbps_bwd=gb_bwd, pct_peak=pct, error=error))
    return rows


def _bench_rms_norm(s, device, dtype, impls, peaks, warmup, repeats):
    from . import rms_norm

    R, N, res = s["rows"], s["N"], s.get("residual", False)
    e = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(R, N, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(N, device=device, dtype=torch.float32, requires_grad=True)
    r = torch.randn(R, N, device=device, dtype=dtype, requires_grad=True) if res else None
    inputs = [x, w] + ([r] if res else [])
    n_act = R * N * e
    # fwd: read x (+ r), write y (+ h); bwd: read dy (+ dh), h, write dx (the residual's gradient is the same
    # tensor when the dtypes match); weights/rstd are negligible
    bytes_fwd = n_act * (4 if res else 2)
    bytes_bwd = n_act * (4 if res else 3)
    case = f"rows={R} N={N}" + (" +residual" if res else "")

    def make(b):
        return lambda x, w, *r: rms_norm(x, w, 1e-5, residual=r[0] if r else None, backend=b)

    return _bench_memory_bound("rms_norm", case, make, inputs, bytes_fwd, bytes_bwd, device, dtype, impls, peaks,
                               warmup, repeats)


def _bench_swiglu(s, device, dtype, impls, peaks, warmup, repeats):
    from . import swiglu

    R, N = s["rows"], s["N"]
    g = torch.randn(R, N, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn(R, N, device=device, dtype=dtype, requires_grad=True)
    n_act = g.numel() * g.element_size()
    return _bench_memory_bound("swiglu", f"rows={R} N={N}", lambda b: (lambda g, u: swiglu(g, u, backend=b)),
                               [g, u], 3 * n_act, 5 * n_act, device, dtype, impls, peaks, warmup, repeats)


def _bench_memory_update(s, device, dtype, impls, peaks, warmup, repeats):
    from . import memory_update

    B, M, D = s["B"], s["M"], s["D"]
    mem, new, lg = (torch.randn(B, M, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    n_act = mem.numel() * mem.element_size()
    return _bench_memory_bound("memory_update", f"B={B} M={M} D={D}",
                               lambda b: (lambda m, n, lg: memory_update(m, n, lg, backend=b)), [mem, new, lg],
                               4 * n_act, 7 * n_act, device, dtype, impls, peaks, warmup, repeats)


def _bench_compress_gate(s, device, dtype, impls, peaks, warmup, repeats):
    from . import compress_gate

    B, T, D = s["B"], s["T"], s["D"]
    c = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    lg = torch.randn(B, T, 1, device=device, dtype=dtype, requires_grad=True)
    n_act = c.numel() * c.element_size()
    return _bench_memory_bound("compress_gate", f"B={B} T={T} D={D}",
                               lambda b: (lambda c, lg: compress_gate(c, lg, backend=b)), [c, lg],
                               2 * n_act, 3 * n_act, device, dtype, impls, peaks, warmup, repeats)


_ELEMENTWISE = {
    "rms_norm": _bench_rms_norm,
    "swiglu": _bench_swiglu,
    "memory_update": _bench_memory_update,
    "compress_gate": _bench_compress_gate,
}


def bench_kernels(device: torch.device | str, dtype: torch.dtype,
                  shapes: Optional[dict[str, list[dict[str, Any]]]] = None, *,
                  peaks: Optional[dict[str, float]] = None, warmup: Optional[int] = None,
                  repeats: Optional[int] = None, compile_flex: Optional[bool] = None,
                  rows: Optional[list[dict[str, Any]]] = None,
                  progress: Optional[Callable[[int, int, str], None]] = None) -> list[dict[str, Any]]:
    """Benchmark every kernel; one row (dict with `ROW_KEYS` and `shape`, the case's shape dict) per (kernel, case,
    implementation).

    shapes: {kernel: [shape dict, ...]} for any subset of "flash_attention" (B, H, Lq, Lk, d, causal, prefix_len,
    window), "rms_norm" (rows, N, residual), "swiglu" (rows, N), "memory_update" (B, M, D), "compress_gate"
    (B, T, D); kernels left out are not run. Defaults: `DEFAULT_SHAPES_CUDA` / `DEFAULT_SHAPES_CPU`.
    peaks: from `measure_peaks` (measured here when None). compile_flex: torch.compile flex_attention (default:
    on CUDA only). rows: a list the rows are appended to as they are measured (what a caller keeps if the run
    is interrupted); returned. progress(done, total, label): called before each (kernel, case) with the cases done
    so far, and once at the end.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if shapes is None:
        shapes = DEFAULT_SHAPES_CUDA if device.type == "cuda" else DEFAULT_SHAPES_CPU
    unknown = set(shapes) - {"flash_attention", *_ELEMENTWISE}
    if unknown:
        raise ValueError(f"unknown kernels in shapes: {sorted(unknown)}")
    warmup = (5 if device.type == "cuda" else 1) if warmup is None else warmup
    repeats = (20 if device.type == "cuda" else 3) if repeats is None else repeats
    compile_flex = device.type == "cuda" if compile_flex is None else compile_flex
    if peaks is None:
        peaks = measure_peaks(device)
    impls = _impls_for(device)
    rows = [] if rows is None else rows
    total = sum(len(shapes.get(name, [])) for name in ("flash_attention", *_ELEMENTWISE))
    report = progress or (lambda done, total, label: None)
    done = 0
    for s in shapes.get("flash_attention", []):
        s = {"causal": True, "prefix_len": 0, "window": None, "key_bias": False, **s}
        report(done, total, "flash_attention " + ", ".join(f"{k}={v}" for k, v in s.items()))
        done += 1
        rows += [dict(r, shape=s) for r in _bench_attention(s, device, dtype, impls, peaks, warmup, repeats,
                                                             compile_flex)]
    for name, fn in _ELEMENTWISE.items():
        for s in shapes.get(name, []):
            report(done, total, f"{name} " + ", ".join(f"{k}={v}" for k, v in s.items()))
            done += 1
            rows += [dict(r, shape=dict(s)) for r in fn(s, device, dtype, impls, peaks, warmup, repeats)]
    report(total, total, "")
    return rows
