"""`ltm_extensions.bench` on CPU with tiny shapes: rows have the documented keys and positive times."""

import torch

from ltm_extensions.bench import ROW_KEYS, bench_kernels, measure_peaks

TINY = {
    "flash_attention": [
        dict(B=1, H=2, Lq=32, Lk=32, d=32, causal=True, prefix_len=0, window=None),
        dict(B=1, H=2, Lq=24, Lk=40, d=32, causal=True, prefix_len=8, window=10),
        dict(B=2, H=2, Lq=16, Lk=32, d=16, causal=True, prefix_len=16, window=None, key_bias=True),
    ],
    "rms_norm": [dict(rows=16, N=32, residual=True)],
    "swiglu": [dict(rows=16, N=32)],
    "memory_update": [dict(B=2, M=4, D=16)],
    "compress_gate": [dict(B=2, T=8, D=16)],
}


def test_measure_peaks_cpu():
    peaks = measure_peaks("cpu", size=128, repeats=2)
    assert peaks["matmul_tflops_bf16"] > 0 and peaks["copy_gbps"] > 0


def test_bench_kernels_cpu_tiny():
    rows = bench_kernels("cpu", torch.float32, shapes=TINY, peaks={"matmul_tflops_bf16": 1.0, "copy_gbps": 10.0},
                         warmup=1, repeats=2)
    assert rows
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        for key in ("kernel", "case", "impl", "dtype", "fwd_ms", "bwd_ms", "tflops_fwd", "pct_peak"):
            assert key in row
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"flash_attention", "rms_norm", "swiglu", "memory_update", "compress_gate"}
    impls = {r["impl"] for r in rows if r["kernel"] == "flash_attention"}
    assert {"torch_ref", "sdpa", "flex"} <= impls
    assert "triton" not in {r["impl"] for r in rows}  # Triton is only benchmarked on CUDA
    for row in rows:
        if row["impl"] == "flex" and row["fwd_ms"] is None:
            assert row["error"]  # flex may not run here: the error is reported instead of a time
            continue
        assert row["fwd_ms"] > 0, row
        assert row["pct_peak"] > 0, row
        if row["bwd_ms"] is None:
            assert row["error"].startswith("backward"), row
        else:
            assert row["bwd_ms"] > 0, row
        if row["kernel"] == "flash_attention":
            assert row["tflops_fwd"] > 0
        else:
            assert row["gbps_fwd"] > 0
    for row in rows:
        if row["impl"] in ("torch_ref", "sdpa"):
            assert row["error"] is None and row["bwd_ms"] > 0, row


def test_the_key_bias_read_is_the_same_attention_in_every_impl():
    """The bench's key-bias read (the tokens memory's): the reference adds the bias to the prefix keys' scores,
    SDPA gets it folded into one more head dim, FlexAttention as a score_mod; all give the same output and
    gradients (q, k, v and the bias), so their times compare the same work."""
    from ltm_extensions import flash_attention
    from ltm_extensions.bench import _flex_fn, _sdpa_folded
    from ltm_extensions.reference import attention_mask

    g = torch.Generator().manual_seed(0)
    B, H, lq, prefix, d = 2, 2, 16, 12, 16
    q, k, v = (torch.randn(B, H, n, d, generator=g).requires_grad_() for n in (lq, prefix + lq, prefix + lq))
    bias = torch.randn(B, prefix, generator=g).requires_grad_()
    do = torch.randn(B, H, lq, d, generator=g)
    mask = attention_mask(lq, prefix + lq, causal=True, prefix_len=prefix)
    shape = dict(B=B, H=H, Lq=lq, Lk=prefix + lq, d=d, causal=True, prefix_len=prefix, window=None, key_bias=True)
    impls = {"reference": lambda *t: flash_attention(*t[:3], prefix_len=prefix, backend="torch", key_bias=t[3]),
             "sdpa": lambda *t: _sdpa_folded(*t, mask), "flex": _flex_fn(shape, torch.device("cpu"), False)}
    results = {}
    for name, fn in impls.items():
        try:
            out = fn(q, k, v, bias)
        except Exception:  # FlexAttention may not run eagerly here (the bench reports the error)
            assert name == "flex"
            continue
        results[name] = [out, *torch.autograd.grad(out, (q, k, v, bias), do)]
    assert "reference" in results and "sdpa" in results
    for name, got in results.items():
        for a, b in zip(got, results["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert results["reference"][4].abs().sum() > 0
