"""Render docs/benchmarks.md from the raw JSON in benchmarks/results/ (written by `ltm bench ... --json`) and the
hand-written reading of those numbers in benchmarks/findings.md (edit that file, not the generated doc).

    python benchmarks/render.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FINDINGS = ROOT / "benchmarks" / "findings.md"
sys.path.insert(0, str(ROOT))

from ltm_core.bench import ratios  # noqa: E402

GPU_TARGETS = [  # (target, key)
    ("attention forward ≥ 0.9× SDPA-flash, causal 4K–16K; backward ≥ 0.8×", "causal"),
    ("prefix+causal ≥ 1.3× SDPA-with-mask and ≥ 1.0× FlexAttention (forward and backward)", "prefix"),
    ("fused RMSNorm / SwiGLU / memory update ≥ 80 % of measured memory bandwidth (forward and backward)", "fused"),
    ("model=base at 32K: ≥ 1.5× full-causal tokens/s at ≤ 1/4 of its peak memory", "model32k"),
    ("MFU ≥ 40 % at 4K", "mfu4k"),
]
NOT_MEASURED = "not yet measured on GPU"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _timed(rows: list[dict], kernel: str) -> dict[tuple[str, str], dict]:
    """(case, impl) -> row, for the rows of `kernel` that have forward and backward times."""
    return {(r["case"], r["impl"]): r for r in rows
            if r["kernel"] == kernel and r.get("fwd_ms") is not None and r.get("bwd_ms") is not None}


def _attention_ratios(rows: list[dict], select, against: str) -> list[tuple[dict, float, float]]:
    """(shape, forward speed ratio, backward speed ratio) of triton against `against` (>1: triton faster)."""
    timed = _timed(rows, "flash_attention")
    out = []
    for (case, impl), tri in timed.items():
        other = timed.get((case, against))
        if impl == "triton" and other and select(tri["shape"]):
            out.append((tri["shape"], other["fwd_ms"] / tri["fwd_ms"], other["bwd_ms"] / tri["bwd_ms"]))
    return out


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def gpu_target_status(kernels: dict | None, models: dict[str, dict]) -> dict[str, str]:
    """Each GPU target's status from the measured JSON: verdict and the numbers it rests on."""
    status = {key: NOT_MEASURED for _, key in GPU_TARGETS}
    if kernels:
        rows = kernels["rows"]
        causal = _attention_ratios(rows, lambda s: s["causal"] and not s["prefix_len"] and s["window"] is None
                                   and s["Lq"] == s["Lk"], "sdpa")
        if causal:
            ok = all(f >= 0.9 and b >= 0.8 for _, f, b in causal)
            status["causal"] = _verdict(ok) + ": " + ", ".join(
                f"{_k(s['Lq'])} d={s['d']} fwd {f:.2f}× bwd {b:.2f}×" for s, f, b in causal)
        prefix = lambda s: s["causal"] and s["prefix_len"] > 0 and s["window"] is None  # noqa: E731
        vs_sdpa, vs_flex = _attention_ratios(rows, prefix, "sdpa"), _attention_ratios(rows, prefix, "flex")
        if vs_sdpa:
            ok = all(min(f, b) >= 1.3 for _, f, b in vs_sdpa) and bool(vs_flex) \
                and all(min(f, b) >= 1.0 for _, f, b in vs_flex)
            parts = [f"{_k(s['Lq'])}+{s['prefix_len']} d={s['d']} vs SDPA fwd {f:.2f}× bwd {b:.2f}×"
                     for s, f, b in vs_sdpa]
            parts += [f"{_k(s['Lq'])}+{s['prefix_len']} d={s['d']} vs Flex fwd {f:.2f}× bwd {b:.2f}×"
                      for s, f, b in vs_flex]
            status["prefix"] = _verdict(ok) + ": " + ", ".join(parts)
        copy = kernels["peaks"]["copy_gbps"]
        fused = [r for r in rows if r["impl"] == "triton" and r["kernel"] in ("rms_norm", "swiglu", "memory_update")
                 and r.get("gbps_fwd") is not None and r.get("gbps_bwd") is not None]
        if fused:
            ok = all(min(r["gbps_fwd"], r["gbps_bwd"]) >= 0.8 * copy for r in fused)
            status["fused"] = _verdict(ok) + f" (copy {copy:,.0f} GB/s): " + ", ".join(
                f"{r['kernel']} {r['case']} fwd {100 * r['gbps_fwd'] / copy:.0f} % bwd "
                f"{100 * r['gbps_bwd'] / copy:.0f} %" for r in fused)
    at32, mfu = [], []
    for name, data in models.items():
        base = data.get("config", {}).get("hidden_size") == 768 and data.get("config", {}).get(
            "num_hidden_layers") == 12
        if not base:
            continue
        batch = data["batch_size"]
        at32 += [(batch, r) for r in ratios(data) if r["context"] == 32768 and r["speedup"] is not None]
        mfu += [(batch, r) for r in data["rows"] if r["context"] == 4096 and "mfu" in r
                and r["model"] in ("memory", "full_causal")]
    if at32:
        ok = any(r["speedup"] >= 1.5 and r["memory_ratio"] <= 0.25 for _, r in at32)
        status["model32k"] = _verdict(ok) + ": " + ", ".join(
            f"batch {b}: {r['speedup']:.2f}× tokens/s at {r['memory_ratio']:.3f}× memory" for b, r in at32)
    if mfu:
        ok = any(r["model"] == "memory" and r["mfu"] >= 0.4 for _, r in mfu)
        status["mfu4k"] = _verdict(ok) + " (memory model): " + ", ".join(
            f"{r['model']} batch {b} {100 * r['mfu']:.1f} %" for b, r in mfu)
    return status


def gpu_targets(kernels: dict | None, models: dict[str, dict]) -> str:
    status = gpu_target_status(kernels, models)
    lines = ["| target (H100/H200, bf16) | status |", "|---|---|"]
    lines += [f"| {target} | {status[key]} |" for target, key in GPU_TARGETS]
    return "\n".join(lines)


def _header(title: str, meta: dict) -> list[str]:
    """A section's title, then the command, machine, date, commit and note of the run."""
    lines = [f"### {title}", ""]
    if meta:
        lines += [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; date: {meta['date']}; "
                  f"commit: {meta['commit']}", ""]
        if meta.get("note"):
            lines += [f"**Note:** {meta['note']}", ""]
    return lines


def kernels_section(name: str, data: dict) -> str:
    peaks = data["peaks"]
    lines = _header(f"`{name}` — {data['device']}, {data['dtype']}", data.get("meta", {}))
    lines += [f"Measured peaks in the same run: bf16 matmul {peaks['matmul_tflops_bf16']:,.0f} TFLOP/s, "
              f"copy {peaks['copy_gbps']:,.0f} GB/s (read + write).", "",
              "| kernel | case | impl | fwd ms | bwd ms | fwd TFLOP/s or GB/s | bwd TFLOP/s or GB/s | fwd % of peak |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if r.get("fwd_ms") is None:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['impl']} | {r['error'][:80]} | | | | |")
            continue
        fwd = r["tflops_fwd"] if r.get("tflops_fwd") is not None else r["gbps_fwd"]
        bwd = r["tflops_bwd"] if r.get("tflops_fwd") is not None else r["gbps_bwd"]
        bwd_ms = "—" if r.get("bwd_ms") is None else f"{r['bwd_ms']:.3f}"
        bwd = "—" if bwd is None else f"{bwd:,.1f}"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['impl']} | {r['fwd_ms']:.3f} | {bwd_ms} | {fwd:,.1f} | "
                     f"{bwd} | {r['pct_peak']:.1f} % |")
    return "\n".join(lines)


def model_section(name: str, data: dict) -> str:
    lines = _header(f"`{name}` — {data['device']}, {data['dtype']}, batch {data['batch_size']}",
                    data.get("meta", {}))
    rss = any("peak_rss_bytes" in r for r in data["rows"])  # CPU rows: resident-set growth beside tensor peak
    lines += ["| model | context | tokens/s | peak memory (MiB) | " + ("RSS growth (MiB) | " if rss else "")
              + "MFU | params |", "|---|---:|---:|---:|" + ("---:|" if rss else "") + "---:|---:|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['context']} | error: {r['error'][-60:]} | |" + (" |" if rss else "")
                         + " | |")
            continue
        extra = f"{r['peak_rss_bytes'] / 2**20:,.1f} | " if rss else ""
        lines.append(f"| {r['model']} | {r['context']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_mem_bytes'] / 2**20:,.1f} | {extra}{100 * r['mfu']:.2f} % | {r['params']:,} |")
    lines += relative_table(data)
    if data.get("generation"):
        lines += ["", "| generation | tokens generated | ms/token | state (KiB) |", "|---|---:|---:|---:|"]
        for g in data["generation"]:
            lines.append(f"| {g['model']} | {g['generated']:,} | {g['ms_per_token']:.2f} | "
                         f"{g['state_bytes'] / 2**10:,.1f} |")
    return "\n".join(lines)


def relative_table(data: dict) -> list[str]:
    """The memory model against its baselines of the same run (`ratios`), per context; a dash where a baseline was
    not run, no table where neither was."""
    def cell(value, digits):
        return "—" if value is None else f"{value:.{digits}f}×"

    lines = [f"| {r['context']:,} | {cell(r['speedup'], 2)} | {cell(r['memory_ratio'], 3)} | "
             f"{cell(r['step_vs_segment_local'], 2)} |" for r in ratios(data)]
    if not lines:
        return []
    return ["", "The memory model relative to its baselines, same run:", "",
            "| context | tokens/s vs full causal | peak memory vs full causal | step vs segment-local |",
            "|---:|---:|---:|---:|", *lines]


CPU_TARGETS = {"tiny": (3.0, 10.0), "small": (2.5, 6.0)}  # memory vs full-causal tokens/s at 8K and at 32K


def _preset(data: dict) -> str:
    """The `--model` preset of a bench run, from its recorded command (tiny when not given)."""
    words = str(data.get("meta", {}).get("command", "")).split()
    return words[words.index("--model") + 1] if "--model" in words[:-1] else "tiny"


def _model_overrides(data: dict) -> list[str]:
    """The `model.*` overrides in a bench run's recorded command."""
    return [w for w in str(data.get("meta", {}).get("command", "")).split() if w.startswith(("model.", "model/"))]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _preset_then(data: dict) -> str:
    """How the preset a run measured differs from today's preset of that name (keys both know), e.g.
    "windows_per_pass=4": empty for a run of today's preset."""
    from ltm_core.configuration import compose, model_config

    now = _flat(dataclasses.asdict(model_config(compose([f"model={_preset(data)}"]))))
    then = _flat(data["config"])
    return ", ".join(f"{k}={then[k]}" for k in sorted(then.keys() & now.keys()) if then[k] != now[k])


def cpu_targets(results: dict[str, dict]) -> str:
    """The window-parallel targets on CPU (2 threads, fp32, batch 1, the default tokens memory): the memory step
    <= 1.25x the segment-local step at 8K and 32K; >= 3x / 10x full causal's tokens/s at 8K / 32K for tiny (2.5x / 6x
    for small); peak memory <= 0.25x full causal's at 8K. One row per result file of the tokens memory with the preset
    as shipped (a run with `model.*` overrides is an experiment: its own section below, no verdict); a run of an
    earlier version of the preset says how it differed."""
    lines = ["| run | processor | step vs segment-local, 8K / 32K (target ≤ 1.25×) | tokens/s vs full causal, 8K / "
             "32K (target) | 8K peak memory vs full causal (target ≤ 0.25×) |", "|---|---|---:|---:|---:|"]
    for name, data in results.items():
        if not isinstance(data.get("config", {}).get("memory"), dict):
            continue  # runs of the earlier memory (before the kinds): their own tables below
        if _model_overrides(data):
            continue
        by_ctx = {r["context"]: r for r in ratios(data)}
        if 8192 not in by_ctx:
            continue
        lo8, lo32 = CPU_TARGETS.get(_preset(data), CPU_TARGETS["tiny"])
        r8, r32 = by_ctx[8192], by_ctx.get(32768)

        def verdict(value, ok):
            return "—" if value is None else f"{value:.2f}× ({'met' if ok(value) else 'NOT met'})"

        local = " / ".join(verdict(r and r["step_vs_segment_local"], lambda v: v <= 1.25) for r in (r8, r32))
        speed = f"{verdict(r8['speedup'], lambda v: v >= lo8)} (≥ {lo8:g}×) / " + (
            f"{verdict(r32['speedup'], lambda v: v >= lo32)} (≥ {lo32:g}×)" if r32 else "—")
        then = _preset_then(data)
        label = f"`{name}`" + (f" (the preset then: {then})" if then else "")
        lines.append(f"| {label} | {processor(data)} | {local} | {speed} | "
                     f"{verdict(r8['memory_ratio'], lambda v: v <= 0.25)} |")
    if len(lines) == 2:
        lines.append("| (no run of the tokens memory recorded yet) | | | | |")
    return "\n".join(lines)


def processor(data: dict) -> str:
    """The processor a run names in its meta's machine ("x86_64 (AMD EPYC), 2 cores, Linux": between the first
    parenthesis and the last, as a name may hold its own, "Intel(R) Xeon(R) ..."), "—" for runs recorded before the
    meta named it."""
    machine = data.get("meta", {}).get("machine", "")
    start, end = machine.find("("), machine.rfind(")")
    return machine[start + 1:end] if 0 <= start < end else "—"


def _is_gpu(data: dict) -> bool:
    return not str(data["device"]).startswith("cpu")


def render(results: Path, findings: str) -> str:
    """The benchmarks doc: the intro, `findings` (what the measurements show, by hand), then the generated
    target verdicts and tables of every `*model*.json` / `*kernels*.json` under `results`."""
    models = {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*model*.json"))}
    kernels = {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*kernels*.json"))}
    gpu_models = {n: d for n, d in models.items() if _is_gpu(d)}
    cpu_models = {n: d for n, d in models.items() if not _is_gpu(d)}
    gpu_kernels = {n: d for n, d in kernels.items() if _is_gpu(d)}
    parts = ["# Benchmarks", "", "Generated by `python benchmarks/render.py` from the raw JSON in "
             "`benchmarks/results/`. Ratios compare rows measured side by side in one run. Peak memory is tensor "
             "memory: the most one training step after warm-up holds allocated beyond what it started with "
             "(activations, gradients, temporaries; the CUDA allocator's peak, or on CPU the profiler's allocation "
             "record of that step). CPU rows also give the resident-set growth from before warm-up (allocator "
             "caching and, compiled, the compiler's workspace included). MFU counts FLOPs the nanoGPT/torchtitan way "
             "(6N plus attention over every key of the segment, no causal discount, plus the memory's read and "
             "write, whose slot key/value projection runs M / segment times per token; rows measured before "
             "2026-12-03 counted it once, the same where M = segment, as in model=base; each row keeps the "
             "flops_per_token it used) against the FLOP/s of a "
             "matmul each row measures in its process (1024 x 1024 fp32 on CPU, 8192 x 8192 in the run's dtype on "
             "GPU), the highest of the run's rows since 2026-12-06 (each row's own before): a causal kernel does "
             "about half the attention work counted, and on CPU long-context attention "
             "runs faster than that small matmul, so full-causal rows at long context exceed 100 %. GPU kernel "
             "times are `triton.testing.do_bench` medians (L2 flushed between calls).", "",
             "## What the measurements show", "", findings.strip(), "",
             "## GPU targets", "", gpu_targets(next(iter(gpu_kernels.values()), None), gpu_models), ""]
    if gpu_kernels:
        parts += ["## GPU: `ltm bench kernels`", ""]
        parts += [part for name, data in gpu_kernels.items() for part in (kernels_section(name, data), "")]
    if gpu_models:
        parts += ["## GPU: `ltm bench model`", ""]
        parts += [part for name, data in gpu_models.items() for part in (model_section(name, data), "")]
    parts += ["## CPU targets", "", cpu_targets(cpu_models), "", "## CPU: `ltm bench model`", "",
              "MFU on CPU is relative to an fp32 1024×1024 matmul timed in the same process; the full-causal rows "
              "spend most of their time in PyTorch's fused CPU flash attention, which runs closer to that ceiling "
              "than small matmuls do, so their MFU can read near or above 100 %.", ""]
    for name, data in cpu_models.items():
        parts += [model_section(name, data), ""]
    return "\n".join(parts)


def main() -> None:
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text(render(RESULTS, FINDINGS.read_text()))
    print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
