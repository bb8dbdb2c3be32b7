"""babi_facts: where is each person? (bAbI qa1 "single supporting fact", spread through KJV text as in BABILong).

    <BOS> kjv ... "\\nMary moved to the kitchen.\\n" ... kjv ... "\\nMary went to the garden.\\n" ... kjv
          "\\nWhere is Mary? Mary is in the " garden ".  "   (the answer padded: ANSWER_SPAN)

`facts` location facts about `names` people are scattered at uniform positions; a later fact about a person
overrides an earlier one. The question asks about a person with at least one fact; the answer is the room of
their last fact, produced greedily. Metric: exact match of the room (6 rooms: chance 1/6); over the samples whose
person had been in another room before (`overwrite_share` of them) also `overwrite_match`, and `stale_answer`, the
share answered with a room the person had left (a fact the last one should have overwritten).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ltm_core.config import TaskConfig
from ltm_core.tasks.common import Cell, TaskSample, filler, insert, sorted_offsets, with_bos
from ltm_core.tasks.metrics import label_match

if TYPE_CHECKING:  # annotations only: generating samples needs no torch
    from ltm_core.model import TitanModel

NAMES = ("Mary", "John", "Sandra", "Daniel", "Fred", "Julie")
ROOMS = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
VERBS = ("moved to", "went to", "journeyed to", "travelled to")
QUESTION = "\nWhere is {name}? {name} is in the "
ANSWER_SPAN = max(map(len, ROOMS)) + 1  # the answer, a full stop, spaces: the prompt's end does not tell its length


def fact_text(name: str, verb: str, room: str) -> str:
    return f"\n{name} {verb} the {room}.\n"


def min_length(facts: int) -> int:
    """A conservative lower bound: the longest facts, question and answer without filler."""
    longest_fact = max(len(fact_text(n, v, r)) for n in NAMES for v in VERBS for r in ROOMS)
    longest_question = max(len(QUESTION.format(name=n)) for n in NAMES)
    return 1 + facts * longest_fact + longest_question + ANSWER_SPAN


def make_babi_facts(rng: np.random.Generator, length: int, facts: int = 6, names: int = 4,
                    split: str = "train") -> TaskSample:
    """A sample of exactly `length` tokens: `facts` facts about the first `names` NAMES, the question, then the
    answer padded to ANSWER_SPAN ("office. ", "bathroom."): every sample of a length has its answer at the same
    position, so where the prompt ends (in its segment) says nothing about which room it is."""
    if not 1 <= names <= len(NAMES):
        raise ValueError(f"names must be in [1, {len(NAMES)}], got {names}")
    if length < min_length(facts):
        raise ValueError(f"a babi_facts sample with {facts} facts needs at least {min_length(facts)} tokens, "
                         f"got {length}")
    who = [NAMES[i] for i in rng.integers(0, names, size=facts)]
    where = [ROOMS[i] for i in rng.integers(0, len(ROOMS), size=facts)]
    how = [VERBS[i] for i in rng.integers(0, len(VERBS), size=facts)]
    texts = [fact_text(n, v, r) for n, v, r in zip(who, how, where)]
    name = who[int(rng.integers(0, facts))]
    last = max(i for i in range(facts) if who[i] == name)
    answer = where[last]  # the last fact about `name` counts
    question = QUESTION.format(name=name)
    slack = length - 1 - sum(map(len, texts)) - len(question) - ANSWER_SPAN
    offsets = sorted_offsets(rng, slack, facts)
    haystack, starts = insert(filler(rng, "kjv", slack, split), list(zip(offsets, texts)))
    tokens = with_bos(haystack + question + (answer + ".").ljust(ANSWER_SPAN))
    assert len(tokens) == length
    # the rooms the person had left by the question: an answer among them kept a fact the last one overwrote
    overwritten = sorted({where[i] for i in range(last) if who[i] == name} - {answer})
    info = {"fact_starts": [1 + s for s in starts], "name": name, "supporting_fact": 1 + starts[last],
            "overwritten_rooms": overwritten}
    start = length - ANSWER_SPAN
    return TaskSample(tokens, [(start, start + len(answer))], answer, info)


class BabiFactsTask:
    """The babi_facts task for training (`data=babi_facts`) and evaluation (`ltm eval task=babi_facts`)."""

    name = "babi_facts"

    def filler(self, cfg: TaskConfig) -> str:
        return "kjv"

    def min_length(self, cfg: TaskConfig, segment_length: int) -> int:
        return min_length(max(cfg.facts, cfg.train_facts or 0))

    def train_sample(self, rng: np.random.Generator, length: int, cfg: TaskConfig, segment_length: int,
                     split: str = "train") -> TaskSample:
        facts = cfg.facts if cfg.train_facts is None else int(rng.integers(1, cfg.train_facts + 1))
        return make_babi_facts(rng, length, facts, cfg.names, split)

    def cells(self, cfg: TaskConfig, lengths: Sequence[int], segment_length: int) -> list[Cell]:
        need = min_length(cfg.facts)
        return [Cell(length, skip=None if length >= need else f"shorter than {need} tokens") for length in lengths]

    def make(self, rng: np.random.Generator, cell: Cell, cfg: TaskConfig, segment_length: int) -> TaskSample:
        return make_babi_facts(rng, cell.length, cfg.facts, cfg.names, "eval")

    def score(self, model: TitanModel, samples: Sequence[TaskSample]) -> dict[str, list[float]]:
        from ltm_core.tasks.evaluate import decode_answers

        answers = decode_answers(model, samples, max(map(len, ROOMS)) + 1)
        scores = {"exact_match": [label_match(a, s.answer, ROOMS) for a, s in zip(answers, samples)],
                  "overwrite_share": [float(bool(s.info["overwritten_rooms"])) for s in samples]}
        moved = [(a, s) for a, s in zip(answers, samples) if s.info["overwritten_rooms"]]
        if moved:  # the samples that test overwriting: the person was in another room before their last fact
            scores["overwrite_match"] = [label_match(a, s.answer, ROOMS) for a, s in moved]
            scores["stale_answer"] = [max(label_match(a, r, ROOMS) for r in s.info["overwritten_rooms"])
                                      for a, s in moved]
        return scores
