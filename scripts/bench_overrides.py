"""CPU training steps of one model under several sets of config overrides (an A/B of an option), each in its own
process, all timed in turn (`ltm_core.bench.rows_interleaved`, as `ltm bench model`'s rows), so the ratios hold on a
shared machine. The first set is the baseline of the printed ratios.

    python scripts/bench_overrides.py --model tiny --context 8192 --set model.kernels=torch --set "" \
        [--variant memory] [--repeats 12] [--json out.json]

(`--set ""`: the preset as it is; several overrides in one set are separated by spaces.)
"""

from __future__ import annotations

import argparse
import json

from ltm_core.bench import cpu_row, rows_interleaved
from ltm_core.configuration import compose, model_config
from ltm_cli.bench import script_meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--variant", default="memory")
    parser.add_argument("--set", dest="sets", action="append", required=True,
                        help="overrides of one row, space-separated (repeat for each row)")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    arg_sets = [cpu_row(model_config(compose([f"model={args.model}", *overrides.split()])), args.variant,
                        args.context) for overrides in args.sets]
    rows = rows_interleaved(arg_sets, warmup=1, repeats=args.repeats)
    result = {"model": args.model, "context": args.context, "variant": args.variant, "repeats": args.repeats,
              "rows": [{"overrides": overrides, **row} for overrides, row in zip(args.sets, rows)],
              "meta": script_meta("scripts/bench_overrides.py")}
    base = rows[0].get("step_s")
    for r in result["rows"]:
        if "error" in r:
            print(f"[{r['overrides']}]: {r['error']}")
            continue
        ratio = f", {r['step_s'] / base:.3f}x the first" if base else ""
        print(f"[{r['overrides']}]: step {r['step_s']:.3f} s (steps {', '.join(f'{t:.3f}' for t in r['step_times_s'])})"
              f"{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
