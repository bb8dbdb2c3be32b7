"""The optimizer step alone: `ltm_core.training.build_optimizer`'s AdamW (fused) against PyTorch's default AdamW
(one parameter at a time on CPU) over a preset's parameters, with random gradients, the two timed in turn.

    python scripts/bench_optimizer.py --model small [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ltm_cli.bench import script_meta
from ltm_core.config import OptimConfig
from ltm_core.configuration import compose, model_config
from ltm_core.model import TitanModel
from ltm_core.training import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each (after 3 warm-up steps)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg, optim = model_config(compose([f"model={args.model}"])), OptimConfig()
    model = TitanModel(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    fused = build_optimizer(model, optim)
    default = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                 for g in fused.param_groups], lr=optim.lr, betas=(optim.beta1, optim.beta2))
    rows = {"fused": fused, "default": default}
    times = {name: [] for name in rows}
    for _ in range(3):
        for opt in rows.values():
            opt.step()
    for _ in range(args.steps):
        for name, opt in rows.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"{args.model}: optimizer step {ms['fused']:.2f} ms fused, {ms['default']:.2f} ms PyTorch's default "
          f"({ms['fused'] / ms['default']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "steps": args.steps, "step_ms": ms,
                       "step_times_ms": {n: [1e3 * x for x in t] for n, t in times.items()},
                       "meta": script_meta("scripts/bench_optimizer.py")}, f, indent=1)


if __name__ == "__main__":
    main()
