"""What the main thread does while the other threads wait: a CPU training step's serial time, by kind.

Each row (the memory model's training step, then the segment-local model's) runs in a process of its own, taking
steps; `perf record` samples that process for a few seconds (every thread, the function each sample falls in), and
each main-thread sample is paired with every other thread's nearest sample (within one sampling interval). Where all
of them are idle (in the OpenMP runtime, libgomp, spinning for work, or with no sample there: off the CPU), the main
thread's sample is serial time: Python, dispatch, autograd, single-threaded loops, and the end of a parallel op that
one thread finishes late. Per row: the step under perf, the serial share of the main thread's samples, that share by
the kind of function it was in (GEMM kernels, the Python interpreter, the compiled CPU passes, PyTorch's elementwise
loops, the OpenMP runtime itself, the rest), and the functions the serial samples fell in most:

    python scripts/serial_time.py --model tiny --context 8192 [--seconds 8] [--set "model.windows_per_pass=4"]
        [--top 12] [--json out.json]

`scripts/step_costs.py` gives the same gap as Amdahl's law does (steps at one and at N threads); this script says
where the main thread is during it. Needs Linux `perf`, allowed to record a process of the same user
(`/proc/sys/kernel/perf_event_paranoid` at most 2). perf slows the steps somewhat; the shares are what count.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

VARIANTS = ("memory", "segment_local")
KINDS = ("gemm", "python", "compiled_passes", "elementwise", "openmp", "rest")
FREQUENCY = 1999  # samples per second and thread (odd: not in step with a timer)
TOP = 30  # the serial samples' most frequent functions kept per row
_SAMPLE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+[0-9a-f]+\s+(.*) \((.*)\)\s*$")  # tid time: ip function (library)


def parse_samples(text: str) -> list[tuple[int, float, str, str]]:
    """`perf script -F tid,time,ip,sym,dso` output of a recording without call chains (a line per sample) -> [(tid,
    time in s, the function the sample fell in, its library's file name)]; lines of another form are skipped."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples.append((int(match.group(1)), float(match.group(2)), match.group(3), Path(match.group(4)).name))
    return samples


def kind(symbol: str, library: str) -> str:
    """The kind of function a sample fell in (one of KINDS)."""
    if "mkl_" in symbol or "gemm" in symbol:
        return "gemm"
    if library.startswith(("libpython", "python3")):
        return "python"
    if library.startswith("perf-"):  # code compiled at run time (Numba's passes), named in perf's map file
        return "compiled_passes"
    if any(s in symbol for s in ("VectorizedLoop", "function_ref", "serial_for_each", "vec::")):
        return "elementwise"
    if library.startswith("libgomp"):
        return "openmp"
    return "rest"


def serial_split(samples: list[tuple[int, float, str, str]], main: int, window: float) -> dict:
    """The main thread's (tid `main`) samples, each paired with every other thread's nearest -> {"samples": the main
    thread's, "serial": those during which every other thread was idle, "kinds": {kind: such samples}, "functions":
    the TOP functions they fell in most, {function (library): samples}}. A thread is idle at t when its nearest
    sample within `window` s fell in the OpenMP runtime, or when it has none there (perf samples running threads
    only: it was off the CPU, asleep)."""
    others: dict[int, list[tuple[float, bool]]] = {}
    for tid, t, symbol, library in samples:
        if tid != main:
            others.setdefault(tid, []).append((t, library.startswith("libgomp")))
    for series in others.values():
        series.sort()
    times = {tid: [t for t, _ in series] for tid, series in others.items()}

    def idle(tid: int, t: float) -> bool:
        series, i = others[tid], bisect.bisect_left(times[tid], t)
        near = min((j for j in (i - 1, i) if 0 <= j < len(series)), key=lambda j: abs(series[j][0] - t))
        return abs(series[near][0] - t) > window or series[near][1]

    total, serial, kinds, functions = 0, 0, Counter(), Counter()
    for tid, t, symbol, library in samples:
        if tid == main:
            total += 1
            if all(idle(other, t) for other in others):
                serial += 1
                kinds[kind(symbol, library)] += 1
                functions[f"{symbol[:80]} ({library})"] += 1
    return {"samples": total, "serial": serial, "kinds": {k: kinds.get(k, 0) for k in KINDS},
            "functions": dict(functions.most_common(TOP))}


def _child(model: str, context: int, variant: str, overrides: str) -> None:
    """Take training steps until killed, one line per step (its seconds), after a line "ready" once warm."""
    import time

    import ltm_core.bench as bench
    from ltm_core.configuration import compose, model_config

    cfg = model_config(compose([f"model={model}", *overrides.split()]))
    row = bench.TrainStepRow(cfg, variant, context, 1, "cpu", "float32")
    for _ in range(2):
        row.step()
    print("ready", flush=True)
    while True:
        start = time.perf_counter()
        row.step()
        print(time.perf_counter() - start, flush=True)


def record(model: str, context: int, variant: str, overrides: str, seconds: float, perf: str) -> dict:
    """One row: its process sampled for `seconds` -> {"step_ms": the median step under perf, "steps", "main_tid",
    and `serial_split`'s counts}."""
    child = subprocess.Popen([sys.executable, __file__, "--child", variant, "--model", model, "--context",
                              str(context), "--set", overrides], stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "ready":
            raise SystemExit(f"error: the {variant} row's process stopped before its first step (exit {child.wait()})")
        with tempfile.TemporaryDirectory() as tmp:
            data = str(Path(tmp) / "perf.data")
            done = subprocess.run([perf, "record", "-F", str(FREQUENCY), "-o", data, "-p", str(child.pid), "--",
                                   "sleep", str(seconds)], capture_output=True, text=True)
            if done.returncode != 0 or not Path(data).exists():
                why = (done.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"error: perf record failed ({why}); see /proc/sys/kernel/perf_event_paranoid",
                      file=sys.stderr)
                raise SystemExit(2)
            text = subprocess.run([perf, "script", "-i", data, "-F", "tid,time,ip,sym,dso"], capture_output=True,
                                  text=True).stdout
    finally:
        child.kill()
        rest = child.communicate()[0]
    steps = [1e3 * float(line) for line in rest.split()]
    split = serial_split(parse_samples(text), child.pid, 1.0 / FREQUENCY)
    return {"model": variant, "step_ms": statistics.median(steps) if steps else None, "steps": len(steps),
            "main_tid": child.pid, **split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--seconds", type=float, default=8.0, help="sampling time per row")
    parser.add_argument("--set", dest="overrides", default="", help="config overrides, space-separated")
    parser.add_argument("--top", type=int, default=12, help="functions listed per row (the JSON keeps %d)" % TOP)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.model, args.context, args.child, args.overrides)
        return
    perf = shutil.which("perf")
    if perf is None:
        print("error: scripts/serial_time.py needs Linux `perf` on PATH (e.g. the linux-tools package)",
              file=sys.stderr)
        raise SystemExit(2)
    from ltm_cli.bench import script_meta

    rows = [record(args.model, args.context, v, args.overrides, args.seconds, perf) for v in VARIANTS]
    result = {"model": args.model, "context": args.context, "seconds": args.seconds, "overrides": args.overrides,
              "rows": rows, "meta": script_meta("scripts/serial_time.py")}
    print(f"{'share of main-thread samples':>30} " + " ".join(f"{r['model']:>14}" for r in rows))
    print(f"{'step under perf (ms)':>30} " + " ".join(f"{r['step_ms'] or 0:14.1f}" for r in rows))
    print(f"{'serial (other threads idle)':>30} "
          + " ".join(f"{r['serial'] / max(r['samples'], 1):14.1%}" for r in rows))
    for k in KINDS:
        print(f"{'  ' + k:>30} " + " ".join(f"{r['kinds'][k] / max(r['samples'], 1):14.1%}" for r in rows))
    for r in rows:
        print(f"{r['model']}: the serial samples' most frequent functions (share of the main thread's samples)")
        for function, n in list(r["functions"].items())[:args.top]:
            print(f"  {n / max(r['samples'], 1):6.2%}  {function}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
