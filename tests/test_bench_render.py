"""benchmarks/render.py: the CPU target verdicts in docs/benchmarks.md follow the measured ratios."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_render():
    spec = importlib.util.spec_from_file_location("render", ROOT / "benchmarks" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(speedup_8k: float, mem_8k: float, local_8k: float = 1.1, speedup_32k: float = 12.0,
           preset: str = "tiny") -> dict:
    """A CPU `ltm bench model` result of the tokens memory: at 8K the memory model runs at `speedup_8k` x full
    causal's tokens/s with `mem_8k` x its peak memory and takes `local_8k` x the segment-local step."""
    rows = []
    for context, speed, mem, local in ((8192, speedup_8k, mem_8k, local_8k), (32768, speedup_32k, 0.02, 1.2)):
        step = 1.0 / speed  # the full-causal step takes 1 s
        rows += [{"model": "memory", "context": context, "tokens_per_s": 1000.0 * speed, "peak_mem_bytes": 100 * mem,
                  "step_s": step, "mfu": 0.1, "params": 1},
                 {"model": "segment_local", "context": context, "tokens_per_s": 1000.0 * speed * local,
                  "peak_mem_bytes": 100 * mem, "step_s": step / local, "mfu": 0.1, "params": 1},
                 {"model": "full_causal", "context": context, "tokens_per_s": 1000.0, "peak_mem_bytes": 100,
                  "step_s": 1.0, "mfu": 0.1, "params": 1}]
    return {"device": "cpu", "dtype": "float32", "batch_size": 1, "rows": rows,
            "config": {"memory": {"kind": "tokens"}},
            "meta": {"command": f"ltm bench model --model {preset}", "machine": "x86_64", "date": "2026-12-03", "commit": "0"}}


def test_cpu_target_verdicts():
    """The window-parallel targets: step <= 1.25x segment-local at 8K and 32K; tokens/s >= 3x / 10x full causal
    (tiny) or 2.5x / 6x (small) at 8K / 32K; 8K peak memory <= 0.25x full causal's. Runs of the earlier memory
    (no `memory` kind in their config) and runs with `model.*` overrides (experiments) keep only their own sections."""
    render = load_render()
    old = result(9.0, 0.1)
    del old["config"]
    changed = result(9.0, 0.1)
    changed["meta"]["command"] += " model.bptt_segments=16"
    table = render.cpu_targets({"fast": result(3.5, 0.1), "slow": result(2.9, 0.3, local_8k=1.3, speedup_32k=9.0),
                                "small": result(2.6, 0.2, speedup_32k=6.5, preset="small"), "old": old,
                                "changed": changed})
    rows = {line.split("`")[1]: line for line in table.splitlines() if line.startswith("| `")}
    assert set(rows) == {"fast", "slow", "small"}
    assert "1.10× (met) / 1.20× (met)" in rows["fast"] and "3.50× (met) (≥ 3×)" in rows["fast"]
    assert "12.00× (met) (≥ 10×)" in rows["fast"] and "0.10× (met)" in rows["fast"]
    assert "1.30× (NOT met)" in rows["slow"] and "2.90× (NOT met) (≥ 3×)" in rows["slow"]
    assert "9.00× (NOT met) (≥ 10×)" in rows["slow"] and "0.30× (NOT met)" in rows["slow"]
    assert "2.60× (met) (≥ 2.5×)" in rows["small"] and "6.50× (met) (≥ 6×)" in rows["small"]
    assert "| memory | 8,192 | 3,500 |" in render.model_section("fast", result(3.5, 0.1))


def test_cpu_target_rows_name_the_processor():
    """Timings differ between processors: a verdict row names the one its run's meta records, "—" where an older
    run's meta does not."""
    render = load_render()
    named = result(3.5, 0.1)
    named["meta"]["machine"] = "x86_64 (AMD EPYC), 2 cores, Linux"
    marked = result(3.5, 0.1)
    marked["meta"]["machine"] = "x86_64 (Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz), 2 cores, Linux"
    runs = {"named": named, "marked": marked, "older": result(3.5, 0.1)}
    rows = {line.split("`")[1]: line for line in render.cpu_targets(runs).splitlines() if line.startswith("| `")}
    assert rows["named"].startswith("| `named` | AMD EPYC | 1.10× (met)")
    assert rows["marked"].startswith("| `marked` | Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz | 1.10× (met)")
    assert rows["older"].startswith("| `older` | — | 1.10× (met)")


def test_runs_of_an_earlier_preset_say_how_it_differed():
    """A preset changes over time (tiny's windows_per_pass was 4): the verdict row of a run recorded before says
    which of its values differ from today's preset of that name; a run of today's preset says nothing more."""
    render = load_render()
    earlier = result(3.5, 0.1)
    earlier["config"].update(windows_per_pass=4, segment_length=64)
    today = result(3.5, 0.1)
    today["config"].update(windows_per_pass=6, segment_length=64)
    table = render.cpu_targets({"earlier": earlier, "today": today})
    rows = {line.split("`")[1]: line for line in table.splitlines() if line.startswith("| `")}
    assert rows["earlier"].startswith("| `earlier` (the preset then: windows_per_pass=4) |")
    assert rows["today"].startswith("| `today` |")


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


def test_model_sections_compare_the_memory_model_with_the_baselines_run():
    """Each model section's relative table: tokens/s and peak against full causal's, the step against the
    segment-local step, a dash for a baseline not run, and no table where neither ran."""
    render = load_render()
    both = render.model_section("cpu", result(3.5, 0.1, local_8k=1.2))
    assert "| 8,192 | 3.50× | 0.100× | 1.20× |" in both
    no_full = result(3.5, 0.1, local_8k=1.2)
    no_full["rows"] = [r for r in no_full["rows"] if r["model"] != "full_causal"]
    assert "| 8,192 | — | — | 1.20× |" in render.model_section("cpu", no_full)
    alone = result(3.5, 0.1)
    alone["rows"] = [r for r in alone["rows"] if r["model"] == "memory"]
    assert "relative to its baselines" not in render.model_section("cpu", alone)


def kernel_rows(causal_ratio: float, prefix_ratio: float, flex_ratio: float, bandwidth: float) -> dict:
    """A GPU kernel bench result: SDPA / FlexAttention times are the Triton times times the given ratios."""
    rows = []

    def attention(shape, impl, ms):
        case = f"{shape['Lq']}+{shape['prefix_len']}"
        rows.append({"kernel": "flash_attention", "case": case, "impl": impl, "fwd_ms": ms, "bwd_ms": 2 * ms,
                     "shape": shape})

    for lq in (4096, 16384):
        shape = dict(B=1, H=16, Lq=lq, Lk=lq, d=128, causal=True, prefix_len=0, window=None)
        attention(shape, "triton", 1.0)
        attention(shape, "sdpa", causal_ratio)
    shape = dict(B=4, H=16, Lq=4096, Lk=4608, d=128, causal=True, prefix_len=512, window=None)
    attention(shape, "triton", 1.0)
    attention(shape, "sdpa", prefix_ratio)
    attention(shape, "flex", flex_ratio)
    for kernel in ("rms_norm", "swiglu", "memory_update"):
        rows.append({"kernel": kernel, "case": "c", "impl": "triton", "fwd_ms": 1.0, "bwd_ms": 1.0,
                     "gbps_fwd": bandwidth, "gbps_bwd": bandwidth, "shape": {}})
    return {"device": "NVIDIA H200", "dtype": "torch.bfloat16", "peaks": {"copy_gbps": 1000.0,
                                                                          "matmul_tflops_bf16": 700.0},
            "rows": rows}


def base_model(speedup: float, memory_ratio: float, mfu: float) -> dict:
    rows = []
    for context, speed, mem in ((4096, 1.0, 1.0), (32768, speedup, memory_ratio)):
        rows += [{"model": "memory", "context": context, "tokens_per_s": 1000.0 * speed, "peak_mem_bytes": 100 * mem,
                  "mfu": mfu, "params": 1},
                 {"model": "full_causal", "context": context, "tokens_per_s": 1000.0, "peak_mem_bytes": 100,
                  "mfu": 0.5, "params": 1}]
    return {"device": "NVIDIA H200", "dtype": "bfloat16", "batch_size": 1, "rows": rows,
            "config": {"hidden_size": 768, "num_hidden_layers": 12}}


def test_gpu_target_verdicts_follow_the_measured_ratios():
    render = load_render()
    unmeasured = render.gpu_target_status(None, {})
    assert set(unmeasured.values()) == {render.NOT_MEASURED}
    good = render.gpu_target_status(kernel_rows(0.95, 1.4, 1.1, 850.0), {"b": base_model(1.6, 0.2, 0.45)})
    assert all(v.startswith("met") for v in good.values()), good
    assert "4K d=128 fwd 0.95× bwd 0.95×" in good["causal"] and "fwd 85 % bwd 85 %" in good["fused"]
    bad = render.gpu_target_status(kernel_rows(0.85, 1.2, 0.9, 700.0), {"b": base_model(1.4, 0.3, 0.3)})
    assert all(v.startswith("NOT met") for v in bad.values()), bad
    # each target fails on its own number: flex alone too slow
    flex_only = render.gpu_target_status(kernel_rows(0.95, 1.4, 0.9, 850.0), {})
    assert flex_only["prefix"].startswith("NOT met") and flex_only["causal"].startswith("met")
    assert flex_only["model32k"] == render.NOT_MEASURED
    # a model that is not model=base does not count for the model=base target
    small = base_model(1.6, 0.2, 0.45)
    small["config"] = {"hidden_size": 256, "num_hidden_layers": 4}
    assert render.gpu_target_status(None, {"s": small})["model32k"] == render.NOT_MEASURED
    table = render.gpu_targets(None, {})
    assert table.count(render.NOT_MEASURED) == len(render.GPU_TARGETS)


def test_the_doc_carries_the_findings_between_the_intro_and_the_generated_tables(tmp_path):
    """The hand-written findings survive a re-render: they sit after the intro, before the generated sections."""
    render = load_render()
    (tmp_path / "cpu_model_fast.json").write_text(json.dumps(result(3.5, 0.1)))
    findings = "### CPU\n\nThe memory model holds 7.5 MiB at every length (measured).\n"
    doc = render.render(tmp_path, findings)
    assert doc.startswith("# Benchmarks\n")
    intro, rest = doc.split("## What the measurements show\n", 1)
    assert "Generated by `python benchmarks/render.py`" in intro and "7.5 MiB" not in intro
    shown, generated = rest.split("## GPU targets\n", 1)
    assert findings.strip() in shown
    assert "| `cpu_model_fast` | — | 1.10× (met) / 1.20× (met) | 3.50× (met)" in generated
    assert "### `cpu_model_fast`" in generated


def test_the_committed_doc_is_the_render_of_the_committed_results():
    """docs/benchmarks.md is generated: editing it by hand, or a result or findings file without re-rendering,
    leaves it stale (run `python benchmarks/render.py`)."""
    render = load_render()
    expected = render.render(render.RESULTS, render.FINDINGS.read_text())
    assert (ROOT / "docs" / "benchmarks.md").read_text() == expected
