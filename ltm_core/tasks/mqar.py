"""mqar: multi-query associative recall (Zoology, Arora et al. 2023), spread over segments.

    <BOS> "abK cdQ efZ ... "  noise (lower-case KJV, >= gap_segments full segments)  "\\n" "cdQ abK efZ ..."
          key-value pairs                                                               queries

A key is two lower-case letters (676 keys), or with `key_length=1` one lower-case letter or digit (36 keys: one
token per key, as in Zoology, where keys and values are single tokens); its value is one upper-case letter, so
noise (lower-cased) never looks like a value. The pairs end in the first segment(s); at least `gap_segments` whole
segments of noise separate the segment holding the last pair from the queries, so a model can only answer from
its memory. Every key is queried once, in random order; the scored positions are the values in the query part
(teacher forced, as in Zoology). Metrics: accuracy at those positions (chance 1/26), and the accuracy of the first
query alone (no earlier answer to eliminate: a model that recalls the stored values but not their keys scores
~1/pairs there).
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ltm_core.config import TaskConfig
from ltm_core.tasks.common import Cell, TaskSample, filler, with_bos

if TYPE_CHECKING:  # annotations only: generating samples needs no torch
    from ltm_core.model import TitanModel

KEYS = {2: [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase],  # key length -> keys
        1: list(string.ascii_lowercase + string.digits)}
VALUES = string.ascii_uppercase


def pair_chars(key_length: int) -> int:
    """Characters per pair: key, value, space."""
    return key_length + 2


def min_length(pairs: int, segment_length: int, gap_segments: int = 1, key_length: int = 2) -> int:
    """Shortest sample: the pairs, noise to the end of their segment plus `gap_segments` segments, the queries."""
    pairs_end = 1 + pair_chars(key_length) * pairs  # BOS + pairs
    queries_start = (-(-pairs_end // segment_length) + gap_segments) * segment_length
    return queries_start + 1 + pair_chars(key_length) * pairs


def make_mqar(rng: np.random.Generator, length: int, pairs: int, segment_length: int, gap_segments: int = 1,
              split: str = "train", key_length: int = 2) -> TaskSample:
    """A sample of exactly `length` tokens with `pairs` key-value pairs, every key queried once."""
    keys_all, pair = KEYS[key_length], pair_chars(key_length)
    if not 1 <= pairs <= len(keys_all):
        raise ValueError(f"pairs must be in [1, {len(keys_all)}] with {key_length}-character keys, got {pairs}")
    need = min_length(pairs, segment_length, gap_segments, key_length)
    if length < need:
        raise ValueError(f"an mqar sample with {pairs} pairs and segment length {segment_length} needs at least "
                         f"{need} tokens, got {length}")
    keys = [keys_all[i] for i in rng.choice(len(keys_all), size=pairs, replace=False)]
    values = [VALUES[i] for i in rng.integers(0, len(VALUES), size=pairs)]
    order = rng.permutation(pairs)
    context = "".join(f"{k}{v} " for k, v in zip(keys, values))
    queries = "\n" + "".join(f"{keys[i]}{values[i]} " for i in order)
    noise = filler(rng, "kjv", length - 1 - len(context) - len(queries), split, lowercase=True)
    tokens = with_bos(context + noise + queries)
    assert len(tokens) == length
    queries_start = length - len(queries) + 1  # position of the first query key
    targets = [(queries_start + pair * j + key_length, queries_start + pair * j + key_length + 1)
               for j in range(pairs)]
    info = {"pairs": pairs, "pairs_end": 1 + len(context), "queries_start": queries_start}
    return TaskSample(tokens, targets, "", info)


class MqarTask:
    """The mqar task for training (`data=mqar`) and evaluation (`ltm eval task=mqar`)."""

    name = "mqar"

    def filler(self, cfg: TaskConfig) -> str:
        return "kjv (lower-cased)"

    def min_length(self, cfg: TaskConfig, segment_length: int) -> int:
        return min_length(cfg.train_pairs, segment_length, cfg.gap_segments, cfg.key_length)

    def train_sample(self, rng: np.random.Generator, length: int, cfg: TaskConfig, segment_length: int,
                     split: str = "train") -> TaskSample:
        pairs = int(rng.integers(1, cfg.train_pairs + 1))
        return make_mqar(rng, length, pairs, segment_length, cfg.gap_segments, split, cfg.key_length)

    def cells(self, cfg: TaskConfig, lengths: Sequence[int], segment_length: int) -> list[Cell]:
        cells = []
        for length in lengths:
            for pairs in cfg.pairs:
                need = min_length(pairs, segment_length, cfg.gap_segments, cfg.key_length)
                skip, key = (None if length >= need else f"{pairs} pairs need {need} tokens"), "task.lengths"
                if pairs > len(KEYS[cfg.key_length]):  # at any length
                    skip = f"{cfg.key_length}-character keys: at most {len(KEYS[cfg.key_length])} pairs"
                    key = "task.pairs"
                cells.append(Cell(length, pairs, pairs=pairs, skip=skip, skip_key=key))
        return cells

    def make(self, rng: np.random.Generator, cell: Cell, cfg: TaskConfig, segment_length: int) -> TaskSample:
        return make_mqar(rng, cell.length, cell.pairs, segment_length, cfg.gap_segments, "eval", cfg.key_length)

    def score(self, model: TitanModel, samples: Sequence[TaskSample]) -> dict[str, list[float]]:
        from ltm_core.tasks.evaluate import stack, teacher_forced_argmax

        tokens = stack(samples, next(model.parameters()).device)
        positions = [start for start, _ in samples[0].targets]
        predicted = teacher_forced_argmax(model, tokens, positions)  # [B, pairs]
        right = (predicted == tokens[:, positions]).float()  # [B, pairs], in query order
        # the first query is the pure key -> value test: later ones can be answered by elimination (the values
        # already queried are visible in the segment), so a model that only recalls the set of stored values
        # scores about 1/pairs here and more on `accuracy`
        return {"accuracy": right.mean(dim=1).tolist(), "exact_match": right.min(dim=1).values.tolist(),
                "first_query_accuracy": right[:, 0].tolist()}
