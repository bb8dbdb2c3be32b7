"""`loss_by_position` (ltm eval --by-position): the bins, the bookkeeping against a per-window reference, and the
curves the no-memory baselines must give on corpora where the answer is known: flat after the first segment for the
segment-local model (it restarts at every segment), falling for the full-causal one (it sees everything)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltm_core import TitanConfig, TitanModel
from ltm_core.config import DataConfig
from ltm_core.data import Corpus, EvenWindows, RandomWindows
from ltm_core.evaluate import evaluate, loss_by_position, position_bins
from support import tiny_model


def test_bins_split_the_first_segments_finer_and_never_cross_a_segment():
    bins = position_bins(1024, 64)
    assert bins[:8] == [(8 * i, 8 * i + 8) for i in range(8)]  # segment 0: 8 bins
    assert bins[8:12] == [(64 + 16 * i, 80 + 16 * i) for i in range(4)]  # segment 1: 4
    assert bins[12:14] == [(128, 160), (160, 192)]  # segment 2: 2
    assert bins[14:] == [(s, s + 64) for s in range(192, 1024, 64)]  # then one per segment
    for length, segment in ((100, 32), (64, 64), (20, 4), (7, 3)):
        bins = position_bins(length, segment)
        assert bins[0][0] == 0 and bins[-1][1] == length and all(a[1] == b[0] for a, b in zip(bins, bins[1:]))
        assert all(e > s and s // segment == (e - 1) // segment for s, e in bins)  # non-empty, inside one segment
        assert {s // segment for s, _ in bins} == set(range(-(-length // segment)))  # every segment has a bin
    assert position_bins(100, 32)[-1] == (96, 100)  # a last, partial segment


def _random_corpus(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint16)


def test_the_bins_are_the_per_position_losses_of_the_evaluation_windows(tiny_cfg):
    """Every bin is the mean of the per-token losses a plain loop over the validation windows computes (one window
    at a time, here batched by 3), and the overall loss is `evaluate`'s."""
    model = tiny_model(tiny_cfg, perturb=True).eval()
    corpus = Corpus(_random_corpus(2000, 0), _random_corpus(900, 1), "random bytes")
    data = DataConfig(name="random", seq_len=64, val_samples=5, batch_size=3)
    result = loss_by_position(model, data, corpus)
    per_position = np.zeros(64)
    windows = EvenWindows(corpus.val, 64, 5)
    with torch.no_grad():
        for x, y in (windows[i] for i in range(len(windows))):
            per_position += F.cross_entropy(model(x[None]).logits[0], y, reduction="none").numpy() / len(windows)
    assert [(b["start"], b["end"]) for b in result["bins"]] == position_bins(64, tiny_cfg.segment_length)
    for b in result["bins"]:
        assert b["loss"] == pytest.approx(per_position[b["start"]:b["end"]].mean(), abs=1e-5)
        assert b["bpb"] == pytest.approx(b["loss"] / np.log(2), rel=1e-12)
    assert [s["loss"] for s in result["segments"]] == pytest.approx(per_position.reshape(4, 16).mean(1), abs=1e-5)
    assert result["loss"] == pytest.approx(evaluate(model, data, corpus)["loss"], abs=1e-5)
    assert result["windows"] == 5 and result["tokens"] == 320 and result["memory"] == "tokens"


def test_a_segment_local_model_gives_every_segment_the_same_loss_on_a_periodic_text(tiny_cfg):
    """Exact, without training: a text of period 8 puts the same tokens in every 16-token segment of any window, and
    a segment-local model restarts at every segment, so every segment's loss is the same. A memory model and a
    full-causal model of the same weights read what came before, and theirs differ (the bookkeeping would hide
    nothing)."""
    period = np.random.default_rng(0).integers(0, 256, 8).astype(np.uint16)
    corpus = Corpus(np.tile(period, 300), np.tile(period, 200), "periodic")
    data = DataConfig(name="periodic", seq_len=96, val_samples=7, batch_size=4)
    memory = tiny_model(tiny_cfg, perturb=True).eval()
    local_cfg = dataclasses.replace(tiny_cfg, use_memory=False, short_conv_carry=False)
    local = tiny_model(local_cfg).eval()
    full = tiny_model(dataclasses.replace(local_cfg, segment_length=96)).eval()
    for baseline in (local, full):
        baseline.load_state_dict(memory.state_dict(), strict=False)  # all but the memory's importance weights
    flat = [s["loss"] for s in loss_by_position(local, data, corpus)["segments"]]
    assert len(flat) == 6 and max(flat) - min(flat) < 1e-5
    for model in (memory, full):
        curve = [s["loss"] for s in loss_by_position(model, data, corpus, segment_length=16)["segments"]]
        assert max(curve) - min(curve) > 1e-3


def _key_corpus(documents: int, seed: int, length: int = 4096, p: float = 0.4) -> np.ndarray:
    """Documents of random bytes in which a key byte of the document replaces each byte with probability p: the
    more of its document a model has seen, the better it knows the key."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(documents):
        doc = rng.integers(0, 256, length)
        doc[rng.random(length) < p] = rng.integers(256)
        docs.append(doc)
    return np.concatenate(docs).astype(np.uint16)


def _trained(segment_length: int, corpus: Corpus, steps: int = 100) -> TitanModel:
    torch.manual_seed(0)
    model = TitanModel(TitanConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, use_memory=False,
                                   segment_length=segment_length, bptt_segments=1, short_conv=0,
                                   short_conv_carry=False, kernels="torch"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    batches = torch.utils.data.DataLoader(RandomWindows(corpus.train, 64, seed=0, batch_size=16), batch_size=16)
    for _, (x, y) in zip(range(steps), batches):
        loss = model(x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_the_baselines_curves_flat_for_segment_local_falling_for_full_causal():
    """Trained briefly on documents whose key byte shows only over many tokens: the full-causal model (one 64-token
    segment) knows the key better the further it reads, so its loss falls segment after segment; the segment-local
    model (segments of 8) starts afresh at every segment, so its curve is flat after the first."""
    corpus = Corpus(_key_corpus(200, 1), _key_corpus(20, 2), "key documents")
    data = DataConfig(name="key", seq_len=64, val_samples=512, batch_size=64)
    full = [s["loss"] for s in loss_by_position(_trained(64, corpus), data, corpus, segment_length=8)["segments"]]
    local = [s["loss"] for s in loss_by_position(_trained(8, corpus), data, corpus)["segments"]]
    assert full[0] > full[1] + 0.1 and np.mean(full[4:]) < full[1] - 0.03, full  # falling
    assert max(local[1:]) - min(local[1:]) < 0.15 and local[-1] > local[1] - 0.05, local  # flat
    assert np.mean(full) < np.mean(local) - 0.2
