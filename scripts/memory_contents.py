"""Which tokens a `tokens` memory holds: a diagnostic for passkey runs (docs/experiments/passkey.md).

    python scripts/memory_contents.py CKPT --lengths 768,3072 --samples 20 [model.memory.select_dedup=0.97 ...]

Evaluates the passkey grid as `ltm eval task=passkey` does (same samples, same greedy decoding) and prints, for each
sample answered wrong, the answer, which of the key's digits each layer's memory holds after the prompt (x: held) and
the characters of the tokens it holds, in order. Needs the tokens memory (it follows the candidates each write
keeps, through the model's public write hook, `TitanModel.register_write_hook`).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import numpy as np
import torch

from ltm_core.errors import LtmError
from ltm_core.model import TitanModel


@contextlib.contextmanager
def tracked_positions(model: TitanModel) -> Iterator[dict[int, torch.Tensor]]:
    """While open, each memory layer's writes also record which token positions its entries came from: yields
    {layer index: [B, M] positions (-1: empty)}, updated at every write. Positions count the tokens written since
    the context opened, so open it for one stream (one prefill)."""
    if model.config.memory_kind != "tokens":
        raise ValueError("tracked_positions needs the tokens memory (model/memory=tokens)")
    held: dict[int, torch.Tensor] = {}
    seen: dict[int, int] = {}

    def record(layer: int, entries: torch.Tensor, kept: torch.Tensor) -> None:
        B, M = kept.shape
        S = entries.shape[1]
        before = held.get(layer, torch.full((B, M), -1, device=kept.device))
        offset = seen.get(layer, 0)
        positions = torch.cat([before, offset + torch.arange(S, device=kept.device).expand(B, S)], dim=1)
        held[layer], seen[layer] = positions.gather(1, kept), offset + S

    handle = model.register_write_hook(record)
    try:
        yield held
    finally:
        handle.remove()


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
    if model.config.memory_kind != "tokens":
        parser.error(f"{args.checkpoint}: this reads the tokens memory, got model.memory.kind="
                     f"{model.config.memory_kind}")
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
