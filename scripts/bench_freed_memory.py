"""CPU training steps with glibc's malloc keeping freed memory (`ltm_core.resources.keep_freed_memory`, what `ltm
train` and `ltm bench model` do on CPU) against glibc's default, for the memory model and both baselines: each
(variant, setting) row in its own process, all timed in turn (`ltm_core.bench.rows_interleaved`), so the ratios
hold on a shared machine. Each row also reports its timed steps' page faults (the median).

    python scripts/bench_freed_memory.py --model tiny --context 8192 [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from ltm_core.bench import VARIANTS, cpu_row, rows_interleaved
from ltm_core.configuration import compose, model_config

# run first in a row's process: both count the timed steps' page faults (the median is reported); the default
# setting leaves glibc's malloc as it is
COUNT_FAULTS = """
import resource, statistics
import ltm_core.bench as bench
_timed = bench.TrainStepRow.timed_step
def _counted(self):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _timed(self)
    self.__dict__.setdefault("faults", []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
bench.TrainStepRow.timed_step = _counted
_result = bench.TrainStepRow.result
bench.TrainStepRow.result = lambda self: {**_result(self), "page_faults_per_step": int(statistics.median(self.faults))}
"""
SETTINGS = {"kept": COUNT_FAULTS, "glibc default": COUNT_FAULTS + "bench.keep_freed_memory = lambda: False\n"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = model_config(compose([f"model={args.model}"]))
    arg_sets, preludes, labels = [], [], []
    for variant in VARIANTS:
        for setting, prelude in SETTINGS.items():
            arg_sets.append(cpu_row(cfg, variant, args.context))
            preludes.append(prelude)
            labels.append(setting)
    rows = rows_interleaved(arg_sets, warmup=1, repeats=args.repeats, preludes=preludes)
    result = {"model": args.model, "context": args.context, "repeats": args.repeats,
              "rows": [{"setting": label, **row} for label, row in zip(labels, rows)]}
    steps = {(r["model"], r["setting"]): r["step_s"] for r in result["rows"]}
    for r in result["rows"]:
        print(f"{r['model']:>13} {r['setting']:>13}: step {r['step_s']:.3f} s, "
              f"{r['page_faults_per_step']:,} page faults per step, kept: {r['keeps_freed_memory']}")
    for variant in VARIANTS:
        print(f"{variant}: kept / default step {steps[variant, 'kept'] / steps[variant, 'glibc default']:.3f}")
    kept = steps["memory", "kept"]
    print(f"memory vs segment-local step: {kept / steps['segment_local', 'kept']:.2f}x kept, "
          f"{steps['memory', 'glibc default'] / steps['segment_local', 'glibc default']:.2f}x default; "
          f"tokens/s vs full causal: {steps['full_causal', 'kept'] / kept:.2f}x kept, "
          f"{steps['full_causal', 'glibc default'] / steps['memory', 'glibc default']:.2f}x default")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
