"""`ltm bench model`: training-step throughput, peak memory and MFU of the memory model against its baselines.

The variants share one backbone: `memory` (the model's memory kind, windowed backward), `tokens` / `slots` / `delta`
(the memory model with that kind, the same slot count), `segment_local` (same segments, no memory) and
`full_causal` (no memory, one segment spanning the context). Timings: warm-up, then the median of repeats
(synchronised on CUDA). On CPU each (variant, context) row runs in a fresh process of its own, and the rows of one
context take their timed steps in turn (one step of each row per round): the load of a shared machine changes
over seconds, and a row timed after another would meet a different machine (`rows_interleaved`). On CUDA the rows
run one after the other in this process.

Peak memory (`peak_mem_bytes`) is tensor memory, the same quantity on both devices: the most that one training step
after warm-up (forward, backward, optimizer step) holds allocated beyond what was allocated when it began
(parameters and optimizer state), i.e. activations, gradients and temporaries. On CUDA it comes from the caching
allocator's peak counter; on CPU from the profiler's allocation record of that step (`profile_memory=True`). CPU
rows also report `peak_rss_bytes`, the growth of the process's resident set from before warm-up to its high-water
mark, which includes the allocator's cached pages and, with `model.compile=true`, the compiler's workspace.

MFU = flops_per_token(context) * tokens/s / peak FLOP/s. Each row measures a matmul in the run's dtype right after
its steps, in its own process (`peak_flops`); the run's peak (the result's `peak_flops`) is the highest of them, and
every row's MFU divides by it, so that MFUs compare across rows (a small CPU matmul timed once per row varies by a
factor of several on a shared machine).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Optional

import torch

from ltm_core.config import OptimConfig, TitanConfig, memory_config
from ltm_core.model import RECURRENCE, TitanModel
from ltm_core.resources import keep_freed_memory
from ltm_core.training import build_optimizer, windowed_backward
from ltm_extensions.bench import median_ms

VARIANTS = ("memory", "segment_local", "full_causal")  # the default rows
KIND_VARIANTS = ("tokens", "slots", "delta", "neural")  # the memory model with another memory kind (same
# backbone and slot count; the neural memory at its default placement)


def variant_config(base: TitanConfig, variant: str, context: int) -> TitanConfig:
    if variant == "memory":
        return dataclasses.replace(base, use_memory=True)
    if variant in KIND_VARIANTS:
        memory = memory_config({"kind": variant, "slots": base.memory.slots})
        return dataclasses.replace(base, use_memory=True, memory=memory)
    if variant == "segment_local":
        return dataclasses.replace(base, use_memory=False)
    if variant == "full_causal":
        return dataclasses.replace(base, use_memory=False, segment_length=context, bptt_segments=1)
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS + KIND_VARIANTS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_peak_tensor_bytes(fn) -> int:
    """Run fn() under the profiler's memory recording -> the most CPU tensor memory it held allocated at once
    beyond what was allocated when it began (the allocator's running total, reset to 0 when recording starts)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max([0, *totals])


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device` (the ceiling MFU is reported against)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / (median_ms(lambda: a @ b, device, warmup=1, repeats=repeats) * 1e-3)


class TrainStepRow:
    """One (variant, context) row measured in this process: its model and optimizer, warm-up steps, timed steps,
    then the row's measurements. Peak memory is this process's."""

    def __init__(self, cfg: TitanConfig, variant: str, context: int, batch_size: int, device: str, dtype: str):
        self.variant, self.context, self.batch_size = variant, context, batch_size
        self.dev, self.dt = torch.device(device), getattr(torch, dtype)
        self.kept_freed_memory = self.dev.type == "cpu" and keep_freed_memory()  # as `ltm train` on CPU
        torch.manual_seed(0)
        self.model = TitanModel(variant_config(cfg, variant, context)).to(self.dev, self.dt).train()
        self.optimizer = build_optimizer(self.model, OptimConfig())
        self.ids = torch.randint(0, 256, (batch_size, context + 1), device=self.dev)
        self.times: list[float] = []
        _sync(self.dev)
        if self.dev.type == "cpu":
            _reset_peak_rss()
            self.base_rss = _rss_bytes()

    def step(self) -> None:
        windowed_backward(self.model, self.ids[:, :-1], self.ids[:, 1:])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        _sync(self.dev)
        start = time.perf_counter()
        self.step()
        _sync(self.dev)
        self.times.append(time.perf_counter() - start)

    def result(self) -> dict[str, Any]:
        """The row: the median of the timed steps (each kept: on a shared machine their spread says how far to trust
        the median), then the peak memory of one more step, the recurrence share of another and the peak FLOP/s."""
        dev, extra = self.dev, {}
        if dev.type == "cuda":  # one more step, its tensor peak above what it started with
            torch.cuda.reset_peak_memory_stats(dev)
            base_mem = torch.cuda.memory_allocated(dev)
            self.step()
            peak = torch.cuda.max_memory_allocated(dev) - base_mem
        else:
            # resident-set growth, warm-up included; 0 when the step fits in memory the process already holds (the
            # kernel's high-water mark and the resident count it is compared with are kept by lagging per-thread
            # counters, so "no growth" can read as a few pages below zero)
            extra["peak_rss_bytes"] = max(0, _peak_rss_bytes() - self.base_rss)
            extra["keeps_freed_memory"] = self.kept_freed_memory
            peak = cpu_peak_tensor_bytes(self.step)
        step_s = statistics.median(self.times)
        share = recurrence_share(self.step, dev)
        peak_flops = measure_peak_flops(dev, self.dt, n=8192 if dev.type == "cuda" else 1024)  # the row's conditions
        tokens_per_s = self.batch_size * self.context / step_s
        return {"model": self.variant, "context": self.context, "tokens_per_s": tokens_per_s,
                "peak_mem_bytes": int(peak), **extra, "step_s": step_s, "step_times_s": list(self.times),
                "recurrence_share": share,
                "params": self.model.num_parameters(), "flops_per_token": self.model.flops_per_token(self.context),
                "peak_flops": peak_flops}


def train_step_row(cfg: TitanConfig, variant: str, context: int, batch_size: int, device: str, dtype: str,
                   warmup: int, repeats: int) -> dict[str, Any]:
    """Time one (variant, context) training step in this process: warm-up, then `repeats` timed steps."""
    row = TrainStepRow(cfg, variant, context, batch_size, device, dtype)
    for _ in range(warmup):
        row.step()
    for _ in range(repeats):
        row.timed_step()
    return row.result()


def recurrence_share(step, device: torch.device) -> float:
    """The share of one training step spent in the memory recurrence (the profiler ranges `RECURRENCE` around the
    memories' writes and scans; their backward, if any, is not in them): host time on CPU, device time on CUDA.
    The rest is the batched work. 0 without a memory."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        total = time.perf_counter() - start
    ranges = [e for e in prof.events() if e.name == RECURRENCE]
    if device.type == "cuda":
        inside = sum(e.device_time_total for e in ranges) * 1e-6
        total = max(sum(e.self_device_time_total for e in prof.events()) * 1e-6, 1e-12)
    else:
        inside = sum(e.cpu_time_total for e in ranges) * 1e-6
    return min(inside / total, 1.0)


CHILD = "from ltm_core.bench import _child; _child()"  # a row's process


def cpu_row(cfg: TitanConfig, variant: str, context: int, threads: Optional[int] = None) -> dict[str, Any]:
    """The arguments of one fp32, batch-1 CPU training-step row for `rows_interleaved` (the scripts' A/Bs)."""
    return dict(variant=variant, context=context, batch_size=1, device="cpu", dtype="float32",
                cfg=dataclasses.asdict(cfg), threads=threads or torch.get_num_threads())


def rows_interleaved(arg_sets: list[dict[str, Any]], warmup: int, repeats: int,
                     preludes: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """CPU rows, each in a fresh process of its own, with their timed steps taken in turn: every row warms up, then
    each round times one step of every row, so a load that changes during the run weighs on all rows alike and the
    ratios between them hold. Each timed step follows an untimed step of its own row, as in training: a step right
    after another row's ran up to 20 % slower (the tiny memory step after the full-causal one, 2026-12-04). A row
    whose process fails reports its error; the others go on. preludes: Python code run first in each row's process
    (an A/B of a module setting: scripts/bench_prefix_read.py). Every row's code first runs a short step in a
    process of its own (`_prime`), so no timed process compiles the CPU passes itself."""
    _prime(arg_sets, preludes)
    rows: list[Optional[dict[str, Any]]] = [None] * len(arg_sets)
    children = []
    try:
        for i, args in enumerate(arg_sets):
            log = tempfile.TemporaryFile(mode="w+")  # stderr: a pipe nobody reads could fill and block the child
            code = CHILD if preludes is None else preludes[i] + "\n" + CHILD
            proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, text=True)
            children.append((proc, log))
        for i, args in enumerate(arg_sets):
            _ask(children[i], rows, i, args, json.dumps({"warmup": warmup, **args}))
        for _ in range(repeats):
            for i, args in enumerate(arg_sets):
                _ask(children[i], rows, i, args, "untimed")
                _ask(children[i], rows, i, args, "step")
        for i, args in enumerate(arg_sets):
            reply = _ask(children[i], rows, i, args, "result")
            if reply is not None:
                rows[i] = json.loads(reply)
    finally:
        for proc, log in children:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
    return rows  # type: ignore[return-value]


def _prime(arg_sets: list[dict[str, Any]], preludes: Optional[list[str]]) -> None:
    """One short training step (two BPTT windows at most) of each row's model and code, each in a process of its
    own, before the timed rows start: Numba's disk cache then holds the compiled CPU passes of every code the rows
    run. A row that compiled them in its own process timed 1.3-2.6 % slower than one that loaded them (two
    identical codes, one in a fresh git worktree, 0.974x and 0.988x apart; 1.009x ± 0.006 once primed; `tiny` at 8K,
    2026-12-05). A failing prime is left to the timed row to report."""
    seen = set()
    for i, args in enumerate(arg_sets):
        cfg = args["cfg"]
        short = min(args["context"], 2 * cfg["segment_length"] * cfg["bptt_segments"])
        line = json.dumps({**args, "context": short, "warmup": 1})
        code = CHILD if preludes is None else preludes[i] + "\n" + CHILD
        if (code, line) in seen:
            continue
        seen.add((code, line))
        subprocess.run([sys.executable, "-c", code], input=line + "\n", capture_output=True, text=True)


def _ask(child, rows: list, i: int, args: dict[str, Any], command: str) -> Optional[str]:
    """Send one command line to row i's process and return its one-line reply; if the process has failed, record
    the error in rows[i] (once) and return None."""
    proc, log = child
    if rows[i] is not None:
        return None
    try:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        reply = proc.stdout.readline()
    except (BrokenPipeError, OSError):
        reply = ""
    if reply:
        return reply.strip()
    proc.wait()
    log.seek(0)
    rows[i] = {"model": args["variant"], "context": args["context"], "error": log.read().strip()[-300:]}
    return None


def _child() -> None:
    """A row's process (`rows_interleaved`): a first line with the row's arguments (warm-up included), then "step"
    lines (one timed step each) and "untimed" lines (one step, not timed), and a final "result"; one reply line per
    command."""
    args = json.loads(sys.stdin.readline())
    torch.set_num_threads(args.pop("threads"))
    warmup, cfg = args.pop("warmup"), TitanConfig.from_dict(args.pop("cfg"))
    row = TrainStepRow(cfg, **args)
    for _ in range(warmup):
        row.step()
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "result":
            print(json.dumps(row.result()), flush=True)
            return
        if command == "step":
            row.timed_step()
        else:  # "untimed"
            row.step()
        print("ok", flush=True)


def generation_row(cfg: TitanConfig, variant: str, length: int, device: str,
                   dtype: str = "float32") -> dict[str, Any]:
    """Per-token latency and state size after generating `length` tokens (greedy, batch 1)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = TitanModel(variant_config(cfg, variant, length + 2))  # full_causal: one segment holds it all
    model = model.to(dev, getattr(torch, dtype)).eval()
    prompt = torch.randint(0, 256, (1, 1), device=dev)
    stamps = []
    with torch.inference_mode():
        out = model(prompt)
        for _ in range(length):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(dev)
            stamps.append(time.perf_counter())
            out = model(token, memory=out.memory)
    _sync(dev)
    stamps.append(time.perf_counter())
    per_token = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    tail = per_token[-64:]  # the last (up to) 64 tokens: steady state at this length
    state_bytes = out.memory.nbytes
    return {"model": variant, "generated": length, "ms_per_token": 1e3 * statistics.median(tail),
            "state_bytes": state_bytes}


def bench_model(cfg: TitanConfig, contexts: Iterable[int], variants: Iterable[str] = VARIANTS, batch_size: int = 1,
                device: Optional[str] = None, dtype: str = "float32", warmup: Optional[int] = None, repeats: int = 3,
                gen_lengths: Iterable[int] = (), threads: Optional[int] = None,
                rows: Optional[list[dict[str, Any]]] = None,
                progress: Optional[Callable[[int, int, str], None]] = None) -> dict[str, Any]:
    """All rows of `ltm bench model`, measured side by side in this run. rows: a list the training-step rows are
    appended to as they are measured (what a caller keeps if the run is interrupted). warmup: untimed steps per
    row, None: `default_warmup(cfg)`. progress(done, total, label): called before each row (on CPU before the rows
    of each context, which are measured together; and before each generation row) with the rows done so far and
    the rows about to be measured, and once at the end."""
    contexts, variants, gen_lengths = list(contexts), list(variants), list(gen_lengths)
    if any(n <= 0 for n in (*contexts, *gen_lengths)):  # a zero-length row would time nothing
        raise ValueError(f"context and generation lengths must be positive, got {contexts} and {gen_lengths}")
    total = len(contexts) * len(variants) + 2 * len(gen_lengths)
    report = progress or (lambda done, total, label: None)
    warmup = default_warmup(cfg) if warmup is None else warmup
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    rows = [] if rows is None else rows
    first = len(rows)
    for context in contexts:
        arg_sets = [dict(variant=v, context=context, batch_size=batch_size, device=device, dtype=dtype)
                    for v in variants]
        if dev.type == "cpu":  # a process per row, their timed steps in turn
            report(len(rows) - first, total, f"{', '.join(variants)} @ {context:,} tokens")
            child = {"cfg": dataclasses.asdict(cfg), "threads": threads or torch.get_num_threads()}
            measured = rows_interleaved([{**a, **child} for a in arg_sets], warmup, repeats)
        else:
            measured = []
            for a in arg_sets:
                report(len(rows) + len(measured) - first, total, f"{a['variant']} @ {context:,} tokens")
                try:
                    measured.append(train_step_row(cfg, **a, warmup=warmup, repeats=repeats))
                except Exception as e:  # e.g. out of memory: report it in the row, measure the others
                    measured.append({"model": a["variant"], "context": context,
                                     "error": f"{type(e).__name__}: {e}"[:300]})
                torch.cuda.empty_cache()
        rows.extend(measured)
        set_mfu(rows)
    generation = []
    for n in gen_lengths:
        for v in ("memory", "full_causal"):
            report(len(rows) - first + len(generation), total, f"generate {n:,} tokens, {v}")
            generation.append(generation_row(cfg, v, n, device, dtype))
    report(total, total, "")
    return {**result_header(cfg, device, dtype, batch_size, warmup), "peak_flops": set_mfu(rows), "rows": rows,
            "generation": generation}


def set_mfu(rows: list[dict[str, Any]]) -> Optional[float]:
    """Every timed row's `mfu` against the highest matmul FLOP/s any row measured (None: no row was timed)."""
    timed = [r for r in rows if "tokens_per_s" in r]
    if not timed:
        return None
    peak = max(r["peak_flops"] for r in timed)
    for r in timed:
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
    return peak


def default_warmup(cfg: TitanConfig) -> int:
    """Untimed steps before the timed ones: 1, or 3 with `model.compile` (the first step compiles; with
    compile_mode=reduce-overhead the CUDA-graph trees run one step eagerly and record on the next)."""
    return 3 if cfg.compile else 1


def result_header(cfg: TitanConfig, device: Optional[str], dtype: str, batch_size: int,
                  warmup: int) -> dict[str, Any]:
    """What describes a `bench_model` result besides its rows: device name, dtype, config, batch size, warm-up."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "dtype": dtype, "config": dataclasses.asdict(cfg), "batch_size": batch_size,
            "warmup_steps": warmup}


def ratios(result: dict[str, Any], baseline: str = "full_causal") -> list[dict[str, Any]]:
    """memory / baseline ratios per context where the memory model and a baseline ran: tokens/s (`speedup`) and peak
    memory (`memory_ratio`) against `baseline`'s, and the memory model's step time against the segment-local step
    (`step_vs_segment_local`); a ratio whose baseline was not run is None."""
    by_key = {(r["model"], r["context"]): r for r in result["rows"] if "tokens_per_s" in r}
    out = []
    for (variant, context), row in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        base, local = by_key.get((baseline, context)), by_key.get(("segment_local", context))
        if variant != "memory" or (base is None and local is None):
            continue
        out.append({"context": context,
                    "speedup": None if base is None else row["tokens_per_s"] / base["tokens_per_s"],
                    "memory_ratio": None if base is None else row["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1),
                    "step_vs_segment_local": None if local is None else row["step_s"] / local["step_s"]})
    return out
