"""`ltm_extensions.bench` on CPU with tiny shapes: rows have the documented keys and positive times."""

import torch

from ltm_extensions.bench import ROW_KEYS, bench_kernels, measure_peaks

TINY = {
    "flash_attention": [
        dict(B=1, H=2, Lq=32, Lk=32, d=32, causal=True, prefix_len=0, window=None),
        dict(B=1, H=2, Lq=24, Lk=40, d=32, causal=True, prefix_len=8, window=10),
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
