"""Where a CPU training step's time goes: the memory model's step and the segment-local model's, in one process, their
steps timed in turn, each split into its backward and the forward's parts (perf_counter around the model's
functions; inclusive times: a part's time includes the parts it calls, e.g. `attention` inside `attend`),
and one more step of each counted in the operators it dispatches (ATen kernels, views apart) in its forward, backward
and optimizer step: where a step's time goes to per-operator cost rather than arithmetic, the count says so.
Last, each row's step timed at one thread and at N (`--scaling-threads`, default the process's count; steps taken
in turn), split as Amdahl's law does: serial = (N t_N - t_1) / (N - 1), the time that N threads do not shorten
(Python, dispatch, autograd bookkeeping, single-threaded ops and the threads' imbalance), and parallel = t_1 - serial.

    python scripts/step_costs.py --model tiny --context 8192 [--steps 6] [--set "model.kernels=torch"]
        [--scaling-threads 2] [--json out.json]

The parts' sum is not the step: the forward also runs the embedding, the output head and the loss, and the step the
optimizer. Every row runs in this one process, so the two models share its allocator and threads (as a training run
would not); `ltm bench model` gives the step ratios that count, this script where the difference between them goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ltm_core.bench as bench
from ltm_cli.bench import script_meta
from ltm_core import model as modeling
from ltm_core.configuration import compose, model_config
from ltm_core.layers import RMSNorm
from ltm_core.memory import build_memory

VARIANTS = ("memory", "segment_local")


def parts(memory_class: type) -> dict[str, tuple[object, str]]:
    """The timed parts: name -> (owner, attribute) of the function timed (`memory_class`: the preset's memory kind)."""
    return {
        "forward": (modeling.TitanModel, "forward"),
        "blocks": (modeling.Block, "forward_window"),
        "short_conv": (modeling.Block, "_short_conv_window"),
        "norms": (RMSNorm, "forward"),
        "memory_scan": (memory_class, "scan_windows"),
        "memory_prefix": (memory_class, "scan_prefix"),  # made by the scan itself where it runs compiled (CPU)
        "qkv_projection": (modeling.SelfAttention, "project_rotated"),  # with the rotations
        "qkv_projection_with_kept": (modeling.SelfAttention, "project_with_kept"),  # with the rotations and the
        # kept tokens' keys and values (where `kept_read` does not run)
        "read_kept": (modeling.SelfAttention, "read_kept"),  # the window read: projections, kept keys and values,
        # attention, output projection
        "kept_read": (modeling._KeptRead, "apply"),  # its kept keys and values and attention in one node (CPU fp32)
        "attend": (modeling.SelfAttention, "attend"),  # the attention and its output projection
        "attention": (modeling, "attention"),
        "ffn": (modeling.FeedForward, "forward"),
    }


@contextlib.contextmanager
def timed(targets: dict[str, tuple[object, str]], totals: dict[str, float]):
    """Wrap each target function so its calls add their wall time to totals[name]; restored on exit. A function
    that calls itself (or another name's function) is counted at every level: inclusive times."""
    saved = []
    for name, (owner, attr) in targets.items():
        fn = getattr(owner, attr)

        def wrapper(*args, __fn=fn, __name=name, **kwargs):
            start = time.perf_counter()
            try:
                return __fn(*args, **kwargs)
            finally:
                totals[__name] += time.perf_counter() - start

        saved.append((owner, attr, fn))
        setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row (after 2 warm-up steps)")
    parser.add_argument("--set", dest="overrides", default="", help="config overrides, space-separated")
    parser.add_argument("--scaling-threads", type=int, default=torch.get_num_threads(),
                        help="N of the thread-scaling split (1: no split)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = model_config(compose([f"model={args.model}", *args.overrides.split()]))
    rows = {v: bench.TrainStepRow(cfg, v, args.context, 1, "cpu", "float32") for v in VARIANTS}
    targets = parts(type(build_memory(cfg)))
    totals = {v: defaultdict(float) for v in VARIANTS}
    steps = {v: [] for v in VARIANTS}
    backward = {v: 0.0 for v in VARIANTS}
    for row in rows.values():
        for _ in range(2):
            row.step()
    for _ in range(args.steps):
        for variant, row in rows.items():
            row.step()  # untimed: each timed step follows one of its own row (`rows_interleaved`)
            with timed(targets, totals[variant]), timed_backward(backward, variant):
                start = time.perf_counter()
                row.step()
                steps[variant].append(time.perf_counter() - start)
    n = args.steps
    result = {"model": args.model, "context": args.context, "steps": n, "overrides": args.overrides, "rows": []}
    for variant in VARIANTS:
        ms = {name: 1e3 * totals[variant].get(name, 0.0) / n for name in targets}
        result["rows"].append({"model": variant, "step_ms": 1e3 * statistics.median(steps[variant]),
                               "step_times_ms": [1e3 * t for t in steps[variant]],
                               "backward_ms": 1e3 * backward[variant] / n, "forward_parts_ms": ms,
                               "operators": operator_counts(rows[variant])})
    result["meta"] = script_meta("scripts/step_costs.py")
    mem, local = result["rows"]
    print(f"{'ms per step':>34} {'memory':>9} {'seg-local':>9} {'difference':>10}")
    lines = [("step (median)", mem["step_ms"], local["step_ms"]),
             ("backward", mem["backward_ms"], local["backward_ms"]),
             *[(f"forward: {k}", mem["forward_parts_ms"][k], local["forward_parts_ms"][k]) for k in targets]]
    for label, a, b in lines:
        print(f"{label:>34} {a:9.1f} {b:9.1f} {a - b:+10.1f}")
    print(f"{'operators per step (views)':>34}")
    for phase in PHASES:
        (a, av), (b, bv) = ((r["operators"][phase]["operators"], r["operators"][phase]["views"]) for r in (mem, local))
        print(f"{phase:>34} {a:>9,} {b:>9,} {a - b:>+10,}   ({av:,} / {bv:,})")
    if args.scaling_threads > 1:
        result["threads"] = thread_scaling(rows, args.scaling_threads, n)
        print(f"{'thread scaling, ms per step':>34} {'1 thread':>9} {f'{args.scaling_threads} threads':>10} "
              f"{'serial':>8} {'parallel':>9}")
        for variant, t in result["threads"]["rows"].items():
            print(f"{variant:>34} {t['step_1_ms']:9.1f} {t['step_n_ms']:10.1f} {t['serial_ms']:8.1f} "
                  f"{t['parallel_ms']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def thread_scaling(rows: dict[str, bench.TrainStepRow], threads: int, steps: int) -> dict:
    """Each row's step at 1 thread and at `threads`, `steps` rounds, the thread counts and the rows in turn (each timed
    step after an untimed one of its own) -> {"n": threads, "rows": {variant: the median step_1_ms, step_n_ms, and their
    Amdahl split serial_ms + parallel_ms = step_1_ms}}. The process's thread count is put back."""
    before = torch.get_num_threads()
    times = {(v, t): [] for v in rows for t in (1, threads)}
    try:
        for _ in range(steps):
            for t in (1, threads):
                torch.set_num_threads(t)
                for variant, row in rows.items():
                    row.step()
                    start = time.perf_counter()
                    row.step()
                    times[variant, t].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    out = {}
    for variant in rows:
        t1, tn = (1e3 * statistics.median(times[variant, t]) for t in (1, threads))
        serial = (threads * tn - t1) / (threads - 1)
        out[variant] = {"step_1_ms": t1, "step_n_ms": tn, "serial_ms": serial, "parallel_ms": t1 - serial}
    return {"n": threads, "rows": out}


PHASES = ("forward", "backward", "optimizer")  # forward: the model's and the loss's, every window's


class _OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched under it into counts[(phase(), is_view)]: what runs as kernels, after
    autograd (composite operators counted as the operators they decompose into). A view (an operator returning an
    alias of an input, not in place) is counted apart: it moves no data."""

    def __init__(self, counts: Counter, phase):
        super().__init__()
        self.counts, self.phase = counts, phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        view = bool(schema.returns) and schema.returns[0].alias_info is not None and not schema.is_mutable
        self.counts[(self.phase(), view)] += 1
        return func(*args, **(kwargs or {}))


def operator_counts(row: bench.TrainStepRow) -> dict[str, dict[str, int]]:
    """One more training step of `row`, counted: {phase: {"operators": n, "views": n}} for PHASES."""
    phase, counts = ["forward"], Counter()
    step = row.optimizer.step

    def in_phase(name, fn):
        def call(*args, **kwargs):
            phase.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                phase.pop()
        return call

    row.optimizer.step = in_phase("optimizer", step)
    try:
        with backward_through(in_phase("backward", torch.Tensor.backward)), _OperatorCount(counts, lambda: phase[-1]):
            row.step()
    finally:
        del row.optimizer.step  # the instance attribute: the class's method again
    return {p: {"operators": counts[(p, False)], "views": counts[(p, True)]} for p in PHASES}


@contextlib.contextmanager
def backward_through(call):
    """Inside the block the training steps' backward calls go through `call(loss)` (`TrainStepRow.step` calls
    `ltm_core.bench.windowed_backward`, looked up at call time)."""
    windowed = bench.windowed_backward
    bench.windowed_backward = lambda model, input_ids, labels: windowed(model, input_ids, labels, backward=call)
    try:
        yield
    finally:
        bench.windowed_backward = windowed


def timed_backward(backward: dict[str, float], variant: str):
    """Time the backward calls of the training steps inside the block, into backward[variant]."""

    def timed_call(loss: torch.Tensor) -> None:
        start = time.perf_counter()
        try:
            loss.backward()
        finally:
            backward[variant] += time.perf_counter() - start

    return backward_through(timed_call)


if __name__ == "__main__":
    main()
