"""Metric functions of the tasks, on decoded text or token ids. Each returns a number in [0, 1]."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # position_accuracy takes tensors; the text metrics need no torch
    import torch


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the prediction is exactly the target."""
    return float(prediction == target)


def digit_accuracy(prediction: str, target: str) -> float:
    """Share of the target's characters predicted at their position (a short prediction misses the rest)."""
    if not target:
        raise ValueError("digit_accuracy needs a non-empty target")
    return sum(p == t for p, t in zip(prediction, target)) / len(target)


def label_match(prediction: str, target: str, labels: Sequence[str]) -> float:
    """Single-label exact match over a closed, prefix-free label set: the label the generated text begins with is
    the target. The text may run on after the label (task samples end at the answer, so a model is never taught to
    stop there): "kitchens" names "kitchen"; "kitch" and " kitchen" name no label."""
    for a in labels:
        if any(a != b and b.startswith(a) for b in labels):
            raise ValueError(f"labels must be prefix-free: {a!r} begins another label")
    named = next((label for label in labels if prediction.startswith(label)), None)
    return float(named == target)


def position_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """predicted, target: [B, P] token ids at the scored positions -> [B] share right per sample."""
    return (predicted == target).float().mean(dim=-1)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
