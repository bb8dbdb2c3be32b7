"""passkey: a needle in a haystack (S-NIAH, as in RULER and Mohtashami & Jaggi's passkey retrieval).

    <BOS> filler ... "\\nThe pass key is 48213. Remember it.\\n" ... filler "\\nWhat is the pass key? The pass key is " 48213

The needle sits at a chosen depth of the haystack (0 = right after BOS, 1 = right before the question) or at an
exact token position; the answer is the digits, produced greedily. Metrics: exact match of all digits and
per-digit accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ltm_core.config import TaskConfig
from ltm_core.tasks.common import Cell, TaskSample, filler, filler_kind, insert, with_bos
from ltm_core.tasks.metrics import digit_accuracy, exact_match

if TYPE_CHECKING:  # annotations only: generating samples needs no torch
    from ltm_core.model import TitanModel

NEEDLE_PREFIX = "\nThe pass key is "
NEEDLE_SUFFIX = ". Remember it.\n"
QUESTION = "\nWhat is the pass key? The pass key is "


def min_length(digits: int) -> int:
    """Shortest sample: BOS, the needle, the question and the answer, no filler."""
    return 1 + len(NEEDLE_PREFIX) + digits + len(NEEDLE_SUFFIX) + len(QUESTION) + digits


def make_passkey(rng: np.random.Generator, length: int, digits: int = 5, filler_name: str = "mixed",
                 split: str = "train", depth: Optional[tuple[float, float]] = None,
                 needle_start: Optional[int] = None, filler_start: str = "first") -> TaskSample:
    """A sample of exactly `length` tokens (prompt + answer).

    The needle's depth is drawn uniformly from `depth` = (lo, hi) (default (0, 1)); or `needle_start` gives the
    token position where the needle line begins (1 = right after BOS). `filler_start`: where the RULER filler
    text starts (`common.filler`).
    """
    if length < min_length(digits):
        raise ValueError(f"a passkey sample with {digits} digits needs at least {min_length(digits)} tokens, "
                         f"got {length}")
    key = "".join(str(d) for d in rng.integers(0, 10, size=digits))
    kind = filler_kind(rng, filler_name)
    needle = f"{NEEDLE_PREFIX}{key}{NEEDLE_SUFFIX}"
    slack = length - min_length(digits)  # filler characters; the needle goes at offset 0..slack of it
    if needle_start is not None:
        offset = needle_start - 1
        if not 0 <= offset <= slack:
            raise ValueError(f"needle_start must be in [1, {slack + 1}] for length {length}, got {needle_start}")
    else:
        lo, hi = depth if depth is not None else (0.0, 1.0)
        offset = int(round(rng.uniform(lo, hi) * slack))
    haystack, _ = insert(filler(rng, kind, slack, split, start=filler_start), [(offset, needle)])
    tokens = with_bos(haystack + QUESTION + key)
    assert len(tokens) == length
    start = 1 + offset  # token position of the needle line
    key_start = start + len(NEEDLE_PREFIX)
    info = {"needle_start": start, "needle_end": start + len(needle), "key_start": key_start,
            "key_end": key_start + digits, "depth": offset / slack if slack else 0.0, "filler": kind}
    return TaskSample(tokens, [(length - digits, length)], key, info)


class PasskeyTask:
    """The passkey task for training (`data=passkey`) and evaluation (`ltm eval task=passkey`)."""

    name = "passkey"

    def filler(self, cfg: TaskConfig) -> str:
        return cfg.filler

    def min_length(self, cfg: TaskConfig, segment_length: int) -> int:
        return min_length(cfg.digits)

    def train_sample(self, rng: np.random.Generator, length: int, cfg: TaskConfig, segment_length: int,
                     split: str = "train") -> TaskSample:
        return make_passkey(rng, length, cfg.digits, cfg.filler, split, filler_start=cfg.filler_start)

    def cells(self, cfg: TaskConfig, lengths: Sequence[int], segment_length: int) -> list[Cell]:
        """Per length: `depth_bins` bins over 0-100 % depth, then (placement_checks) the needle at the very start
        of the first segment and the needle split by a segment boundary: between two of the key's digits, or for a
        one-digit key right before it (the needle's "The pass key is" in one segment, the digit in the next)."""
        bins = cfg.depth_bins
        cells = []
        for length in lengths:
            skip = None if length >= min_length(cfg.digits) else f"shorter than {min_length(cfg.digits)} tokens"
            cells += [Cell(length, b, depth=(b / bins, (b + 1) / bins), placement="depth", skip=skip)
                      for b in range(bins)]
            if cfg.placement_checks:
                cells.append(Cell(length, bins, placement="first_segment", skip=skip))
                boundary = _middle_boundary(length, segment_length, cfg.digits)
                straddle_skip = skip or (None if boundary is not None else "no segment boundary for the key to straddle")
                cells.append(Cell(length, bins + 1, depth=(0.5, 0.5), placement="straddle", skip=straddle_skip))
        return cells

    def make(self, rng: np.random.Generator, cell: Cell, cfg: TaskConfig, segment_length: int) -> TaskSample:
        if cell.placement == "first_segment":
            place = {"needle_start": 1}
        elif cell.placement == "straddle":
            boundary = _middle_boundary(cell.length, segment_length, cfg.digits)
            before = int(rng.integers(*_digits_before(cfg.digits)))  # digits left of the boundary
            place = {"needle_start": boundary - before - len(NEEDLE_PREFIX)}
        else:
            place = {"depth": cell.depth}
        return make_passkey(rng, cell.length, cfg.digits, cfg.filler, "eval", filler_start=cfg.filler_start, **place)

    def score(self, model: TitanModel, samples: Sequence[TaskSample]) -> dict[str, list[float]]:
        from ltm_core.tasks.evaluate import decode_answers

        answers = decode_answers(model, samples, len(samples[0].answer))
        return {"exact_match": [exact_match(a, s.answer) for a, s in zip(answers, samples)],
                "digit_accuracy": [digit_accuracy(a, s.answer) for a, s in zip(answers, samples)]}


def _digits_before(digits: int) -> tuple[int, int]:
    """[lo, hi) of how many key digits a straddling needle has before the boundary: 1 .. digits - 1, or 0 for a
    one-digit key."""
    return (1, digits) if digits > 1 else (0, 1)


def _middle_boundary(length: int, segment_length: int, digits: int) -> Optional[int]:
    """The segment boundary nearest the middle of the sample that the key can straddle (any split of
    `_digits_before` digits before it) with the whole needle inside the haystack; None when there is none."""
    slack = length - min_length(digits)
    lo, hi = _digits_before(digits)

    def fits(boundary: int) -> bool:
        first = boundary - (hi - 1) - len(NEEDLE_PREFIX)  # needle_start with the most digits before
        last = boundary - lo - len(NEEDLE_PREFIX)  # needle_start with the fewest digits before
        return first >= 1 and last <= slack + 1

    candidates = [b for b in range(segment_length, length, segment_length) if fits(b)]
    return min(candidates, key=lambda b: abs(b - length / 2)) if candidates else None
