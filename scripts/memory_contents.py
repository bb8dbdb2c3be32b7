"""Which tokens a select-write memory holds: a diagnostic for passkey runs (README, "Passkey").

    python scripts/memory_contents.py CKPT --lengths 768,3072 --samples 20 [model.select_dedup=0.97 ...]

Evaluates the passkey grid as `ltm eval task=passkey` does (same samples, same greedy decoding) and prints, for each
sample answered wrong, the answer, which of the key's digits each layer's memory holds after the prompt (x: held) and
the characters of the tokens it holds, in order. Needs `model.memory_write=select` (it records the indices of the
entries the write keeps, LongTermMemory._keep).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import numpy as np
import torch

from ltm_core.errors import LtmError
from ltm_core.memory import LongTermMemory
from ltm_core.model import TitanModel


@contextlib.contextmanager
def tracked_positions(model: TitanModel) -> Iterator[dict[int, torch.Tensor]]:
    """While open, each memory layer's select write also records which token positions its entries came from:
    yields {layer index: [B, M] positions (-1: empty or the initial memory)}, updated at every write. Positions
    count the tokens written since the context opened, so open it for one stream (one prefill)."""
    layers = [m for m in model.modules() if isinstance(m, LongTermMemory)]
    if any(m.mode != "select" for m in layers):
        raise ValueError("tracked_positions needs model.memory_write=select")
    held: dict[int, torch.Tensor] = {}
    seen = [0] * len(layers)

    def wrap(i: int, keep_of):
        def keep(candidates: torch.Tensor, logits: torch.Tensor, vacant: torch.Tensor) -> torch.Tensor:
            B, M = vacant.shape
            before = held.get(i, torch.full((B, M), -1, device=candidates.device))
            S = candidates.shape[1] - M
            positions = torch.cat([before, seen[i] + torch.arange(S, device=candidates.device).expand(B, S)], dim=1)
            index = keep_of(candidates, logits, vacant)  # [B, M] into the M + S candidates
            held[i], seen[i] = positions.gather(1, index), seen[i] + S
            return index
        return keep

    for i, layer in enumerate(layers):
        layer._keep = wrap(i, layer._keep)  # an instance attribute shadows the method
    try:
        yield held
    finally:
        for layer in layers:
            del layer._keep


def main() -> None:
    from ltm_core.checkpoint import checkpoint_config, load_model, read_checkpoint
    from ltm_core.tasks import get_task
    from ltm_core.tasks.evaluate import cell_samples, decode_answers, eval_task_config, prefill, stack

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--lengths", required=True, help="comma-separated context lengths")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="model.* overrides, as for ltm eval")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    torch.set_num_threads(1)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        model = load_model(args.checkpoint, args.overrides, ckpt=ckpt)
    except LtmError as exc:  # one line, exit 2
        parser.error(str(exc))
    if model.config.memory_write != "select":
        parser.error(f"{args.checkpoint}: this reads the select write, got model.memory_write="
                     f"{model.config.memory_write}")
    cfg = eval_task_config(checkpoint_config(ckpt), ["task=passkey", f"task.samples={args.samples}"])
    task, seg = get_task("passkey"), cfg.layout(model.config.segment_length)
    right: dict[int, list[bool]] = {}
    for cell in task.cells(cfg, [int(x) for x in args.lengths.split(",")], seg):
        samples = cell_samples(task, cell, cfg, seg, range(args.samples))  # as `ltm eval` scores them
        with tracked_positions(model) as held:
            prefill(model, stack(samples, torch.device("cpu"))[:, :samples[0].answer_start])
            layers = [held[i] for i in sorted(held)]
        answers = decode_answers(model, samples, len(samples[0].answer))
        for i, (answer, s) in enumerate(zip(answers, samples)):
            right.setdefault(cell.length, []).append(answer == s.answer)
            if answer == s.answer:
                continue
            key = range(s.info["key_start"], s.info["key_end"])
            kept = [set(layer[i].tolist()) for layer in layers]  # the positions each layer holds
            digits = ["".join("x" if p in positions else "." for p in key) for positions in kept]
            text = ["".join(chr(t) if 32 <= (t := int(s.tokens[p])) < 127 else "?" for p in sorted(positions) if p >= 0)
                    for positions in kept]
            print(f"{cell.length} {cell.placement} depth={cell.row()['depth']} sample={i}: key {s.answer}, "
                  f"answered {answer}; key digits held per layer {digits}; memory {text}")
    for length, ok in right.items():
        print(f"{length}: {100 * np.mean(ok):.1f} % exact match ({len(ok)} samples)")


if __name__ == "__main__":
    main()
