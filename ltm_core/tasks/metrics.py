"""Metric functions of the tasks, on decoded text or token ids. Each returns a number in [0, 1]."""

from __future__ import annotations

import re
from typing import Sequence

import torch


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the prediction is exactly the target."""
    return float(prediction == target)


def digit_accuracy(prediction: str, target: str) -> float:
    """Share of the target's characters predicted at their position (a short prediction misses the rest)."""
    if not target:
        raise ValueError("digit_accuracy needs a non-empty target")
    return sum(p == t for p, t in zip(prediction, target)) / len(target)


def first_word(text: str) -> str:
    """The leading run of letters: what a generated answer says before punctuation, space or EOS."""
    match = re.match(r"[A-Za-z]+", text)
    return match.group(0) if match else ""


def label_match(prediction: str, target: str) -> float:
    """Single-label exact match: the first word of the generated text is the target label."""
    return float(first_word(prediction) == target)


def position_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """predicted, target: [B, P] token ids at the scored positions -> [B] share right per sample."""
    return (predicted == target).float().mean(dim=-1)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
