"""CPU training steps of one model under several sets of config overrides (an A/B of an option), or of the code of
another commit against the working tree's (an A/B of a change: `--base REV`), each row in its own process, all timed
in turn (`ltm_core.bench.rows_interleaved`, as `ltm bench model`'s rows), so the ratios hold on a shared machine. The
first row is the baseline of the printed ratios: the median steps' ratio, and the mean and spread of the ratios of
the steps timed in the same round (paired, so a load that changes during the run cancels out).

    python scripts/bench_overrides.py --model tiny --context 8192 --set model.kernels=torch --set "" \
        [--variant memory] [--repeats 12] [--json out.json]
    python scripts/bench_overrides.py --model tiny --context 8192 --base HEAD~1 [--set ""] [--repeats 40]
    python scripts/bench_overrides.py --model tiny --context 8192 --variant segment_local --span 8192 --span 1536

(`--set ""`: the preset as it is, the default; several overrides in one set are separated by spaces. With `--base`
every set runs twice, first on REV's code, checked out into a temporary git worktree, then on the working tree's.
With `--span` every set runs once per span: the tokens per backward call, instead of the model's own
`ltm_core.training.window_span`; e.g. the segment-local baseline, one batched call by default, in the memory model's
passes.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ltm_core.bench import cpu_row, rows_interleaved
from ltm_core.configuration import compose, model_config
from ltm_cli.bench import script_meta

REPO = Path(__file__).resolve().parents[1]
WORKING_TREE = "working tree"


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """REV's files in a temporary git worktree of this repository (removed on exit). SystemExit(2) with one line if
    REV is no commit here."""
    with tempfile.TemporaryDirectory(prefix="ltm-base-") as tmp:
        tree = Path(tmp) / "tree"
        run = subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, capture_output=True,
                             text=True)
        if run.returncode != 0:
            lines = run.stderr.strip().splitlines() or ["git worktree add failed"]
            print(f"--base {rev}: not a commit of this repository ({lines[-1]})", file=sys.stderr)
            sys.exit(2)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)


def code_prelude(tree: Optional[Path]) -> str:
    """Python run first in a row's process: import `ltm_core` and `ltm_extensions` (the repository's `extensions/`)
    from `tree` (None: the installed working tree), and check that they came from there."""
    if tree is None:
        return f"import ltm_core; assert ltm_core.__file__.startswith({str(REPO) + '/'!r}), ltm_core.__file__"
    root = str(tree)
    return "\n".join([
        "import importlib.util, sys",
        f"sys.path.insert(0, {root!r})",
        f"spec = importlib.util.spec_from_file_location('ltm_extensions', {root + '/extensions/__init__.py'!r}, "
        f"submodule_search_locations=[{root + '/extensions'!r}])",
        "module = importlib.util.module_from_spec(spec); sys.modules['ltm_extensions'] = module",
        "spec.loader.exec_module(module)",
        "import ltm_core",
        f"assert ltm_core.__file__.startswith({root + '/'!r}), ltm_core.__file__",
    ])


def span_prelude(span: Optional[int]) -> str:
    """Python run next in a row's process: every backward call of its training steps over `span` tokens (None: the
    model's own, `ltm_core.training.window_span`, which `windowed_backward` looks up at each call)."""
    if span is None:
        return ""
    return f"\nimport ltm_core.training\nltm_core.training.window_span = lambda cfg, seq_len: {span}"


def paired(base: list[float], other: list[float]) -> dict[str, float]:
    """The ratios other / base of the steps timed in the same round: mean, standard deviation and standard error."""
    ratios = [b / a for a, b in zip(base, other)]
    sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    return {"mean": statistics.mean(ratios), "sd": sd, "se": sd / len(ratios) ** 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--variant", default="memory")
    parser.add_argument("--set", dest="sets", action="append", default=None,
                        help="overrides of one row, space-separated (repeat for each row; default: one row, \"\")")
    parser.add_argument("--base", default=None, help="a commit whose code each set also runs on, first")
    parser.add_argument("--span", dest="spans", type=int, action="append", default=None,
                        help="tokens per backward call (repeat for a row of each; default: the model's own)")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sets = args.sets if args.sets is not None else [""]
    spans = args.spans if args.spans is not None else [None]
    if any(span is not None and span <= 0 for span in spans):
        print(f"--span must be a positive number of tokens, got {min(spans)}", file=sys.stderr)
        sys.exit(2)
    configs = [cpu_row(model_config(compose([f"model={args.model}", *overrides.split()])), args.variant,
                       args.context) for overrides in sets]
    with contextlib.ExitStack() as stack:
        trees: list[tuple[str, Optional[Path]]] = [(WORKING_TREE, None)]
        if args.base is not None:
            trees.insert(0, (args.base, stack.enter_context(checkout(args.base))))
        cells = [(code, tree, overrides, config, span) for code, tree in trees
                 for overrides, config in zip(sets, configs) for span in spans]
        rows = rows_interleaved([config for *_, config, _ in cells], warmup=1, repeats=args.repeats,
                                preludes=[code_prelude(tree) + span_prelude(span) for _, tree, _, _, span in cells])
    result = {"model": args.model, "context": args.context, "variant": args.variant, "repeats": args.repeats,
              "base": args.base, "rows": [{"code": code, "overrides": overrides, "span": span, **row}
                                          for (code, _, overrides, _, span), row in zip(cells, rows)],
              "meta": script_meta("scripts/bench_overrides.py")}
    first = rows[0] if "error" not in rows[0] else None
    for r in result["rows"]:
        name = (f"[{r['overrides']}]" + ("" if args.base is None else f" on {r['code']}")
                + ("" if r["span"] is None else f" in spans of {r['span']}"))
        if "error" in r:
            print(f"{name}: {r['error']}")
            continue
        if first is not None:
            r["paired_ratio"] = paired(first["step_times_s"], r["step_times_s"])
        ratio = "" if first is None else (f", {r['step_s'] / first['step_s']:.3f}x the first (paired "
                                          f"{r['paired_ratio']['mean']:.3f} ± {r['paired_ratio']['se']:.3f})")
        print(f"{name}: step {r['step_s']:.3f} s (steps {', '.join(f'{t:.3f}' for t in r['step_times_s'])}){ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
