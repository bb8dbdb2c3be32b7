"""benchmarks/render.py: the CPU target verdicts in docs/benchmarks.md follow the measured ratios."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_render():
    spec = importlib.util.spec_from_file_location("render", ROOT / "benchmarks" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(speedup_8k: float, mem_8k: float) -> dict:
    rows = []
    for context, speed, mem in ((8192, speedup_8k, mem_8k), (32768, 3.0, 0.02)):
        rows += [{"model": "memory", "context": context, "tokens_per_s": 1000.0 * speed, "peak_mem_bytes": 100 * mem,
                  "mfu": 0.1, "params": 1},
                 {"model": "full_causal", "context": context, "tokens_per_s": 1000.0, "peak_mem_bytes": 100,
                  "mfu": 0.1, "params": 1}]
    return {"device": "cpu", "dtype": "float32", "batch_size": 1, "rows": rows}


def test_cpu_target_verdicts():
    render = load_render()
    table = render.cpu_targets({"fast": result(2.5, 0.1), "slow": result(1.27, 0.3)})
    fast, slow = (line for line in table.splitlines() if line.startswith("| `"))
    assert "2.50× (met)" in fast and "0.100× (met)" in fast and "3.00×" in fast
    assert "1.27× (NOT met)" in slow and "0.300× (NOT met)" in slow
    assert "| memory | 8,192 | 2,500 |" in render.model_section("fast", result(2.5, 0.1))


def test_cpu_rows_show_resident_set_growth_beside_the_tensor_peak():
    render = load_render()
    data = result(2.5, 0.1)
    for row in data["rows"]:
        row["peak_mem_bytes"] = 3 * 2**20
        row["peak_rss_bytes"] = 5 * 2**20
    section = render.model_section("cpu", data)
    assert "| peak memory (MiB) | RSS growth (MiB) | MFU |" in section
    assert "| memory | 8,192 | 2,500 | 3.0 | 5.0 | 10.00 % | 1 |" in section
    assert "RSS growth" not in render.model_section("gpu", result(2.5, 0.1))
