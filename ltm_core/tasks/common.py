"""What every long-context task shares: the sample record, filler text, and insertion at exact positions.

All tasks are byte-level (`ltm_core.tokenizer`): one character is one token, so a position in the text is a
position in the token sequence. A sample is a pure function of a `numpy.random.Generator` seeded by the caller
with (seed, stream, index), so a data loader can resume at any sample and an evaluation is reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ltm_core.tokenizer import BOS

if TYPE_CHECKING:  # torch loads where tensors are made: config validation reads the tasks without it
    import torch

# RULER's niah filler (Hsieh et al., 2024), repeated as often as needed.
RULER_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FILLERS = ("ruler", "kjv", "mixed")
HELD_OUT_BOOKS = 2  # KJV filler: evaluation samples take their text from the last books, training from the rest


@dataclass
class Cell:
    """One cell of an evaluation grid: a context length and the task's other axis (depth bin or pairs)."""

    length: int
    code: int = 0  # tells cells of one length apart in the samples' seeds
    depth: Optional[tuple[float, float]] = None  # passkey: the needle's depth range
    placement: Optional[str] = None  # passkey: depth | first_segment | straddle
    pairs: Optional[int] = None  # mqar: key-value pairs
    skip: Optional[str] = None  # why this cell cannot be evaluated (too short for its pairs)
    skip_key: str = "task.lengths"  # the setting to change when no cell of a length can be evaluated

    def rng(self, seed: int, index: int) -> np.random.Generator:
        """Sample `index` of this cell: a pure function of (seed, length, cell, index)."""
        return np.random.default_rng([seed, EVAL_STREAM, self.length, self.code, index])

    def row(self) -> dict[str, Any]:
        depth = None
        if self.placement == "first_segment":
            depth = 0.0
        elif self.depth is not None:
            depth = round((self.depth[0] + self.depth[1]) / 2, 4)
        return {"length": self.length, "depth": depth, "pairs": self.pairs, "placement": self.placement}


@dataclass
class TaskSample:
    """One sequence: tokens[:answer_start] is the prompt, then the answer tokens.

    `targets` are the [start, end) token spans that are scored (and trained on): for passkey and babi_facts the
    answer at the end; for mqar the value after each query key, inside the sequence (teacher forced).
    """

    tokens: np.ndarray  # [length] int64 token ids, BOS first
    targets: list[tuple[int, int]]  # [start, end) spans of scored tokens
    answer: str  # the gold text of the last target span (passkey digits, babi room); "" for mqar
    info: dict[str, Any] = field(default_factory=dict)  # where things were placed (needle span, depth, ...)

    @property
    def answer_start(self) -> int:
        return self.targets[-1][0]

    def target_mask(self) -> np.ndarray:
        """[length] bool, True at scored positions."""
        mask = np.zeros(len(self.tokens), dtype=bool)
        for start, end in self.targets:
            mask[start:end] = True
        return mask

    def training_pair(self, lm_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each [length - 1]: next-token labels, -100 outside the targets unless lm_loss."""
        import torch

        tokens = torch.from_numpy(self.tokens.astype(np.int64))
        labels = tokens[1:].clone()
        if not lm_loss:
            labels[~torch.from_numpy(self.target_mask()[1:])] = -100
        return tokens[:-1], labels


TRAIN_STREAM, VALIDATION_STREAM, EVAL_STREAM = 0, 1, 2


def sample_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of training (stream 0) or validation (stream 1) sample `index`."""
    return np.random.default_rng([seed, stream, index])


def encode(text: str) -> list[int]:
    data = text.encode("utf-8")
    if len(data) != len(text):
        raise ValueError("task text must be ASCII (one byte per character)")
    return list(data)


@lru_cache(maxsize=2)
def _kjv(split: str) -> tuple[str, np.ndarray]:
    """KJV verse texts of a split joined by spaces, and the offsets where verses start."""
    from ltm_core.data import kjv_path

    verses = [json.loads(line) for line in kjv_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    books: list[str] = []
    for verse in verses:
        if not books or books[-1] != verse["book"]:
            books.append(verse["book"])
    held_out = set(books[-HELD_OUT_BOOKS:])
    texts = [v["text"] for v in verses if (v["book"] in held_out) == (split == "eval")]
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    return " ".join(texts) + " ", starts


def filler_kind(rng: np.random.Generator, kind: str) -> str:
    """Resolve `mixed` to ruler or kjv (equal odds); check the name."""
    if kind not in FILLERS:
        raise ValueError(f"unknown filler {kind!r}; choose one of {', '.join(FILLERS)}")
    return FILLERS[int(rng.integers(0, 2))] if kind == "mixed" else kind


def filler(rng: np.random.Generator, kind: str, n: int, split: str = "train", lowercase: bool = False,
           start: str = "first") -> str:
    """`n` characters of haystack text. ruler: RULER's sentences repeated, from their first character (`start`
    "first", as RULER) or from a random one ("random": every phase of the repetition occurs); kjv: consecutive
    verses from a random verse on (wrapping around), from the held-out books when split="eval" (`start` does not
    apply: the text always starts at a random verse)."""
    if kind == "ruler":
        first = int(rng.integers(0, len(RULER_FILLER))) if start == "random" else 0
        text = (RULER_FILLER * ((first + n) // len(RULER_FILLER) + 1))[first:first + n]
    elif kind == "kjv":
        corpus, starts = _kjv("eval" if split == "eval" else "train")
        first = int(starts[rng.integers(0, len(starts))])  # a verse's first character
        reps = (first + n) // len(corpus) + 1
        text = (corpus * reps)[first:first + n] if reps > 1 else corpus[first:first + n]
    else:
        raise ValueError(f"unknown filler {kind!r}; choose ruler or kjv")
    return text.lower() if lowercase else text


def insert(base: str, items: Sequence[tuple[int, str]]) -> tuple[str, list[int]]:
    """Insert texts into `base` at character offsets of `base` (sorted, ties keep order).
    Returns the text and where each inserted text starts in it."""
    out, starts, prev, shift = [], [], 0, 0
    for pos, text in items:
        if pos < prev:
            raise ValueError("insertion offsets must be sorted")
        out.append(base[prev:pos])
        starts.append(pos + shift)
        out.append(text)
        shift += len(text)
        prev = pos
    out.append(base[prev:])
    return "".join(out), starts


def sorted_offsets(rng: np.random.Generator, high: int, k: int) -> list[int]:
    """k sorted offsets drawn uniformly (with repetition) from [0, high]."""
    return sorted(int(x) for x in rng.integers(0, high + 1, size=k))


def with_bos(text: str) -> np.ndarray:
    return np.array([BOS] + encode(text), dtype=np.int64)

