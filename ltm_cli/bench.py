"""`ltm bench kernels|model|parallel`: performance tables (rich), the same as JSON (`--json`), and plots (`--plot`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ltm_cli.bench_parallel import bench_parallel_cmd
from ltm_cli.errors import check_overrides, device_option, file_name, output_file, user_errors, write_json
from ltm_cli.progress import progress_bar
from ltm_core.errors import ConfigError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: kernels, model throughput/memory, parallel layouts.")
bench_app.command("parallel")(bench_parallel_cmd)
console = Console()


def check_counts(**options: tuple[Any, int]) -> None:
    """One ConfigError line for an option below its minimum: check_counts(**{"--context": ([1024, 0], 1)})."""
    for name, (values, least) in options.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and value < least:
                raise ConfigError(name, f"must be {'positive' if least == 1 else f'at least {least}'}, got {value}")


def check_training_lengths(contexts: list[int], segment_length: int, variants: list[str]) -> None:
    """A training row's context is a whole number of segments, as `ltm train`'s data.seq_len must be: one line
    naming --context and the multiple. The full-causal baseline's one segment spans its context, any length."""
    if all(v == "full_causal" for v in variants):
        return
    for context in contexts:
        if context % segment_length:
            raise ConfigError("--context", f"{context} must be a multiple of model.segment_length={segment_length} "
                                           "(whole segments, as ltm train's data.seq_len)")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def script_meta(script: str) -> dict[str, str]:
    """`run_meta` for a script of the repository (`scripts/...`): its command line as typed."""
    import shlex
    import sys

    return {**run_meta(), "command": " ".join([f"python {script}", *map(shlex.quote, sys.argv[1:])])}


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what `platform` knows: timings differ between
    processors of one architecture, and a result names the one it was measured on."""
    import platform

    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def run_meta() -> dict[str, str]:
    """What a reader needs to reproduce a measurement: command, machine, date and commit."""
    import os
    import platform
    import subprocess
    import sys
    from datetime import datetime, timezone

    commit = os.environ.get("LTM_COMMIT", "")  # set by the caller where the tree has no (or a stale) .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {"command": "ltm " + " ".join(sys.argv[1:]), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} ({cpu_name()}), {os.cpu_count()} cores, {platform.system()}",
            "commit": commit or "unknown"}


def _write_json(path: Optional[Path], payload: dict[str, Any]) -> None:
    if path is not None:
        payload = {**payload, "meta": run_meta()}
        write_json(path, payload)
        console.print(f"wrote {path}")


def _plot_model(path: Path, result: dict[str, Any]) -> None:
    from ltm_core.plotting import pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in sorted({r["model"] for r in result["rows"]}):
        rows = sorted((r for r in result["rows"] if r["model"] == variant and "tokens_per_s" in r),
                      key=lambda r: r["context"])
        ctx = [r["context"] for r in rows]
        ax1.plot(ctx, [r["tokens_per_s"] for r in rows], marker="o", label=variant)
        ax2.plot(ctx, [r["peak_mem_bytes"] / 2**20 for r in rows], marker="o", label=variant)
    for ax, label in ((ax1, "training tokens/s"), (ax2, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"ltm bench model — {result['device']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    console.print(f"wrote {path}")


@bench_app.command("model")
@user_errors
def bench_model_cmd(
    model: str = typer.Option("tiny", "--model", help="Backbone preset from conf/model (tiny | small | base | large)."),
    contexts: List[int] = typer.Option([1024, 2048, 4096, 8192], "--context", help="Context lengths (repeatable)."),
    variants: List[str] = typer.Option([], "--variant", help="memory | segment_local | full_causal | tokens | slots | "
                                       "delta | neural (repeatable; default: memory, segment_local, full_causal)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Sequences per training step."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16."),
    repeats: int = typer.Option(3, "--repeats", help="Timed steps per row (median reported; on CPU the rows of a "
                                "context take them in turn, each right after an untimed step of its own)."),
    warmup: Optional[int] = typer.Option(None, "--warmup",
                                         help="Untimed steps per row (default: 1, or 3 with model.compile=true)."),
    gen: List[int] = typer.Option([], "--gen", help="Generation lengths to measure (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda if available)."),
    json_path: Optional[Path] = typer.Option(None, "--json", parser=file_name, help="Write the results as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", parser=file_name,
                                        help="Write a PNG: tokens/s and peak memory vs context."),
    overrides: List[str] = typer.Argument(None, help="model.* overrides, e.g. model.segment_length=256."),
):
    """Training-step tokens/s, peak memory and MFU: memory model vs segment-local vs full-causal; each row's share of
    the step spent in the memory recurrence (the rest is batched work)."""
    check_counts(**{"--context": (contexts, 1), "--gen": (gen, 1), "--batch-size": (batch_size, 1),
                    "--repeats": (repeats, 1), "--warmup": (warmup, 0)})
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError("--dtype", f"must be float32 or bfloat16, got {dtype!r}")
    # model.* (and model/memory=KIND) only: another key would be composed and then ignored by the benchmark
    check_overrides([o for o in overrides or [] if not o.lstrip("+~").startswith("model/")], ("model",), "bench model")
    from ltm_core.bench import KIND_VARIANTS, VARIANTS, bench_model, default_warmup, ratios, result_header
    from ltm_core.configuration import compose, model_config

    unknown = [v for v in variants if v not in VARIANTS + KIND_VARIANTS]
    if unknown:
        raise ConfigError("--variant", f"must be one of {', '.join(VARIANTS + KIND_VARIANTS)}, got {unknown[0]!r}")
    cfg = model_config(compose([f"model={model}", *(overrides or [])]))
    check_training_lengths(contexts, cfg.segment_length, variants or VARIANTS)
    device = device_option(device)
    output_file(json_path, "--json")
    output_file(plot, "--plot")
    warmup = default_warmup(cfg) if warmup is None else warmup
    rows: list[dict[str, Any]] = []
    try:
        with progress_bar("bench model", "rows") as progress:
            result = bench_model(cfg, contexts, variants=variants or VARIANTS, batch_size=batch_size, device=device,
                                 dtype=dtype, warmup=warmup, repeats=repeats, gen_lengths=gen, rows=rows,
                                 progress=progress)
    except KeyboardInterrupt:  # e.g. a time limit: keep what was measured, marked incomplete
        _write_json(json_path, {**result_header(cfg, device, dtype, batch_size, warmup), "rows": rows,
                                "generation": [], "interrupted": True})
        raise typer.Exit(130)
    table = Table(title=f"ltm bench model — {result['device']}, {dtype}, batch {batch_size}, "
                  f"{' '.join([f'model={model}', *(overrides or [])])}")
    for col in ("model", "context", "tokens/s", "step", "memory recurrence", "peak memory", "MFU", "params"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        if "error" in r:
            table.add_row(r["model"], str(r["context"]), "error", r["error"][-60:], "", "", "", "")
            continue
        table.add_row(r["model"], f"{r['context']:,}", f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f} s",
                      f"{100 * r['recurrence_share']:.1f} %", _gib(r["peak_mem_bytes"]), f"{100 * r['mfu']:.2f} %",
                      f"{r['params']:,}")
    console.print(table)
    summary = Table(title="memory model / baselines (same run)")
    for col in ("context", "tokens/s vs full causal", "peak memory vs full causal", "step vs segment-local"):
        summary.add_column(col, justify="right")
    for r in ratios(result):
        summary.add_row(f"{r['context']:,}", *(_ratio(r[key], digits) for key, digits in
                                              (("speedup", 2), ("memory_ratio", 3), ("step_vs_segment_local", 2))))
    console.print(summary)
    if result["generation"]:
        gen_table = Table(title="generation (greedy, batch 1)")
        for col in ("model", "generated", "ms/token", "state"):
            gen_table.add_column(col, justify="right")
        for g in result["generation"]:
            gen_table.add_row(g["model"], f"{g['generated']:,}", f"{g['ms_per_token']:.2f}",
                              f"{g['state_bytes'] / 2**10:,.1f} KiB")
        console.print(gen_table)
    _write_json(json_path, result)
    if plot is not None:
        _plot_model(plot, result)


def _ratio(value: Optional[float], digits: int) -> str:
    """A ratio of the summary table; a dash where its baseline was not run."""
    return "—" if value is None else f"{value:.{digits}f}x"


@bench_app.command("kernels")
@user_errors
def bench_kernels_cmd(
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32 | float16 | bfloat16 (CPU: float32)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda if available)."),
    json_path: Optional[Path] = typer.Option(None, "--json", parser=file_name, help="Write the rows as JSON."),
):
    """Each kernel against its PyTorch reference; attention also against SDPA and FlexAttention."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError("--dtype", f"must be float32, float16 or bfloat16, got {dtype!r}")
    import torch

    from ltm_extensions.bench import bench_kernels, measure_peaks

    dev = torch.device(device_option(device))
    output_file(json_path, "--json")
    dt = getattr(torch, dtype) if dev.type == "cuda" else torch.float32
    peaks = measure_peaks(dev)
    device_name = str(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu"
    rows: list[dict[str, Any]] = []
    try:
        with progress_bar("bench kernels", "cases") as progress:
            bench_kernels(dev, dt, peaks=peaks, rows=rows, progress=progress)
    except KeyboardInterrupt:  # e.g. a time limit: keep what was measured, marked incomplete
        _write_json(json_path, {"device": device_name, "dtype": str(dt), "peaks": peaks, "rows": rows,
                                "interrupted": True})
        raise typer.Exit(130)
    peak = ", ".join(f"{k} {v:.3g}" for k, v in peaks.items())
    table = Table(title=f"ltm bench kernels — {dev}, {dt}; measured peak {peak}")
    for col in ("kernel", "case", "impl", "fwd ms", "bwd ms", "fwd TFLOP/s | GB/s", "% peak", "note"):
        table.add_column(col, justify="right")
    for r in rows:
        rate = r.get("tflops_fwd") if r.get("tflops_fwd") is not None else r.get("gbps_fwd")
        fmt = (lambda v: "" if v is None else f"{v:.3f}")
        table.add_row(r["kernel"], r["case"], r["impl"], fmt(r.get("fwd_ms")), fmt(r.get("bwd_ms")), fmt(rate),
                      "" if r.get("pct_peak") is None else f"{r['pct_peak']:.1f}", r.get("error") or "")
    console.print(table)
    _write_json(json_path, {"device": device_name, "dtype": str(dt), "peaks": peaks, "rows": rows})
