"""Where does a passkey model's tokens memory rank the key against the filler?

For each layer, the importance (w . entry) of every token of a passkey sample at its segment's write: the key's
lowest digit against the filler's highest and its M-th highest (M = memory slots: what competes for the slots),
medians over samples, and the share of samples where the key's lowest digit outranks that M-th filler token.

    python scripts/passkey_importance_probe.py CKPT --lengths 192 3072 [--samples 16] [--filler ruler] [--digits 5]

docs/experiments/passkey.md uses it to compare runs trained with and without task.filler_start=random.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ltm_core.checkpoint import load_model
from ltm_core.errors import LtmError
from ltm_core.tasks.passkey import QUESTION, make_passkey


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--lengths", type=int, nargs="+", default=[192, 3072])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--filler", default="ruler")
    parser.add_argument("--digits", type=int, default=5, help="the pass key's digits, as trained")
    args = parser.parse_args()
    try:
        model = load_model(args.checkpoint).eval()
    except LtmError as exc:
        parser.error(str(exc))
    cfg = model.config
    if cfg.memory_kind != "tokens":
        parser.error(f"{args.checkpoint}: the probe reads the tokens memory, got model.memory.kind={cfg.memory_kind}")
    M = cfg.memory.slots
    written: list[tuple[int, torch.Tensor]] = []  # (layer, importance of the segment's tokens [B, S])

    def record(layer: int, entries: torch.Tensor, kept: torch.Tensor) -> None:
        written.append((layer, model.blocks[layer].memory.ranks(entries)))

    model.register_write_hook(record)  # the model's public hook, called after every memory write
    for length in args.lengths:
        rng = np.random.default_rng(0)
        per_layer: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(model.blocks))}
        for _ in range(args.samples):
            s = make_passkey(rng, length, args.digits, args.filler, "eval")
            written.clear()
            with torch.no_grad():
                model(torch.tensor(s.tokens)[None, :-1])
            filler = torch.ones(length - 1, dtype=torch.bool)  # input positions 0 .. length - 2
            filler[0] = False  # BOS
            filler[s.info["needle_start"]:s.info["needle_end"]] = False
            filler[s.answer_start - len(QUESTION):] = False
            for layer in per_layer:
                z = torch.cat([w[0] for i, w in written if i == layer])  # [positions written]
                n = len(z)
                if s.info["key_end"] > n:  # the key sits in the last, unwritten segment: nothing to rank
                    continue
                key = z[s.info["key_start"]:s.info["key_end"]].min().item()
                ranked = z[filler[:n]].sort(descending=True).values
                per_layer[layer].append((key, ranked[0].item(), ranked[M - 1].item()))
        for layer, rows in per_layer.items():
            a = np.array(rows)
            print(f"length {length} layer {layer}: key's lowest digit {np.median(a[:, 0]):.2f}, filler top "
                  f"{np.median(a[:, 1]):.2f}, filler {M}th {np.median(a[:, 2]):.2f}; the key above the {M}th in "
                  f"{np.mean(a[:, 0] > a[:, 2]):.2f} of {len(a)} samples")


if __name__ == "__main__":
    main()
