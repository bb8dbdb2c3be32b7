"""The tokens memory's prefix read on CPU, end to end: a training step of the memory model with the read's scores
written out (`ltm_core.attention._ExplicitScores`, up to MATH_MAX_SCORES scores per head) against the same step with
SDPA's fused kernel (the key bias folded into a head dimension), each in its own process, timed in turn
(`ltm_core.bench.rows_interleaved`), like `ltm bench model`'s rows.

    python scripts/bench_prefix_read.py --model tiny --context 8192 [--repeats 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from ltm_core.bench import cpu_row, rows_interleaved
from ltm_core.configuration import compose, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = model_config(compose([f"model={args.model}"]))
    row = cpu_row(cfg, "memory", args.context)
    impls = {"explicit": "10 ** 12", "fused": "0"}  # MATH_MAX_SCORES: every read written out / none
    preludes = [f"import ltm_core.attention as A; A.MATH_MAX_SCORES = {n}" for n in impls.values()]
    rows = rows_interleaved([row, row], warmup=1, repeats=args.repeats, preludes=preludes)
    result = {"model": args.model, "context": args.context, "repeats": args.repeats,
              "rows": [{"impl": impl, **r} for impl, r in zip(impls, rows)]}
    for r in result["rows"]:
        print(f"{r['impl']}: step {r['step_s']:.3f} s, peak {r['peak_mem_bytes'] / 2 ** 20:.1f} MiB")
    print(f"explicit / fused step: {rows[0]['step_s'] / rows[1]['step_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
