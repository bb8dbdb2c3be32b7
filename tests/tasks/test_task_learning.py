"""Does the memory work? A short training run on passkey where the needle is never in the answer's segment:
the memory model must beat the no-memory baseline clearly. Full recipe runs are marked slow (CI skips them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ltm_core import TitanConfig, TitanModel
from ltm_core.config import OptimConfig, TaskConfig
from ltm_core.tasks import get_task
from ltm_core.tasks.common import sample_rng
from ltm_core.tasks.evaluate import evaluate_task
from ltm_core.training import build_optimizer, build_scheduler, windowed_backward

TINY_PASSKEY = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, memory_slots=8, memory_dim=32,
                    segment_length=32, bptt_segments=3)


def train_passkey(cfg: TitanConfig, task: TaskConfig, seq_len: int, steps: int, batch: int = 16) -> TitanModel:
    torch.manual_seed(0)
    model = TitanModel(cfg)
    optim = OptimConfig(lr=3e-3, warmup_steps=20)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps)
    spec = get_task("passkey")
    for step in range(steps):
        pairs = [spec.train_sample(sample_rng(1, 0, step * batch + i), seq_len + 1, task, cfg.segment_length)
                 .training_pair() for i in range(batch)]
        windowed_backward(model, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return model.eval()


# Not in CI (marked slow): on the shared 2-core machine this run took ~7 min and the memory model did not yet beat
# the baseline (both at 0.19 exact match) - issue 3 is open; run with `pytest -m slow tests/tasks`.
@pytest.mark.slow
def test_memory_beats_the_baseline_on_a_tiny_passkey():
    """One-digit pass key, 3 segments of 32 tokens: the question and answer fill the last segment, so the needle
    is always in an earlier one. Without memory the digit is a guess (1/10)."""
    task = TaskConfig(name="passkey", digits=1, filler="ruler", samples=40, batch_size=40, depth_bins=2,
                      placement_checks=False, lengths=[96, 384])
    scores = {}
    for use_memory in (True, False):
        cfg = TitanConfig(**TINY_PASSKEY, use_memory=use_memory, memory_write="select")
        model = train_passkey(cfg, task, seq_len=96, steps=STEPS)
        rows = evaluate_task(model, task, train_length=96)["rows"]
        scores[use_memory] = {length: sum(r["exact_match"] for r in rows if r["length"] == length) / 2
                              for length in (96, 384)}
    assert scores[False][96] < 0.35 and scores[False][384] < 0.35, scores
    assert scores[True][96] > 0.8, scores
    assert scores[True][384] > 0.6, scores  # 4x the training length


STEPS = 300
