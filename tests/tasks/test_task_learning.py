"""Does the memory work? A short training run on passkey where the needle is never in the answer's segment:
the memory model must beat the no-memory baseline clearly. Full recipe runs are marked slow (CI skips them)."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from support import run_ltm

from ltm_core import TitanConfig, TitanModel
from ltm_core.config import OptimConfig, TaskConfig, TokensMemoryConfig
from ltm_core.tasks import get_task
from ltm_core.tasks.common import sample_rng
from ltm_core.tasks.evaluate import evaluate_task
from ltm_core.tasks.mqar import make_mqar
from ltm_core.training import build_optimizer, build_scheduler, windowed_backward

TINY_PASSKEY = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, segment_length=32, bptt_segments=3,
                    memory=TokensMemoryConfig(slots=8))
STEPS = 1500


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


TINY_TASK = dict(name="passkey", digits=1, filler="ruler", samples=40, batch_size=40, depth_bins=2,
                 placement_checks=False, lengths=[96, 384])


def train_and_score(use_memory: bool) -> dict[int, float]:
    """Train the tiny passkey model (with or without memory) and return its exact match at 96 and 384 tokens."""
    torch.set_num_threads(1)  # two of these run side by side on the 2-core CI machine
    cfg = TitanConfig(**TINY_PASSKEY, use_memory=use_memory)
    task = TaskConfig(**TINY_TASK)
    model = train_passkey(cfg, task, seq_len=96, steps=STEPS)
    rows = evaluate_task(model, task, train_length=96)["rows"]
    return {length: sum(r["exact_match"] for r in rows if r["length"] == length) / 2 for length in (96, 384)}


@pytest.mark.slow
def test_memory_beats_the_baseline_on_a_tiny_passkey():
    """One-digit pass key, 3 segments of 32 tokens: the question and answer fill the last segment, so the needle
    is always in an earlier one. Without memory the digit is a guess (1/10). With `memory_write=select` the model
    learns it in ~1,000-1,500 steps (measured 2026-11-23 with these seeds: 1.00 at 96 tokens and 0.81 at 384 after
    1,500 steps; 4,000 steps reach 0.99-1.00 up to 64x). The two models train in two processes side by side, one
    thread each (~130 s for the memory model on the 2-core machine; the baseline ~90 s)."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        scores = dict(zip((True, False), pool.map(train_and_score, (True, False))))
    assert scores[False][96] < 0.35 and scores[False][384] < 0.35, scores
    assert scores[True][96] > 0.7, scores  # clearly learned at the training length
    assert scores[True][384] > scores[False][384] + 0.3, scores  # 4x the training length


@pytest.mark.slow
def test_passkey_recipe_beats_its_baseline_far_beyond_the_training_length(tmp_path):
    """The full two-stage recipe through the CLI (`pytest -m slow`; the runs one after the other, about 21 minutes
    on the 2-core machine, the memory model's two stages 11 min 41 s of them): `ltm train experiment=passkey`
    (memory_read=tokens with the carried short convolution; five-digit key, 96-token samples with the RULER filler
    from a random character, 4,000 steps), then `experiment=passkey_long` resumed from it (192-token samples, 3,000
    steps, near-duplicate suppression in the write), and the same for `experiment=passkey_baseline` /
    `passkey_long_baseline`; then `ltm eval` at 1x and 16x the final training length (192 and 3,072 tokens).
    Measured 2026-12-03 (README, 20 samples per cell, one thread): all seven seeds meet the issue's targets. This
    test (seed 42, two threads) passed at commit 5d8ff36 (20 min 47 s alone): the memory model scored 100 % in
    every cell at 192 tokens and 99.5 % (worst bin 95 %) at 3,072, the baseline 0 % at both. A run's outcome
    depends on the seed, the thread count and the machine (floating-point sums in another order): a failure here
    means this machine's run is one of those the recipe does not serve, as the README's tables count them."""
    scores, worst = {}, {}
    for suffix in ("", "_baseline"):
        first, out = tmp_path / f"run{suffix}", tmp_path / f"run_long{suffix}"
        for args in ([f"experiment=passkey{suffix}", f"output_dir={first}"],
                     [f"experiment=passkey_long{suffix}", f"resume={first / 'checkpoints' / 'last.ckpt'}",
                      f"output_dir={out}"]):
            train = run_ltm("train", *args, "trainer.progress=false", timeout=3600)
            assert train.returncode == 0, train.stderr[-2000:]
        report = tmp_path / f"eval{suffix}.json"
        evaluation = run_ltm("eval", "--checkpoint", str(out / "checkpoints" / "last.ckpt"), "task=passkey",
                             "task.lengths=[192,3072]", "task.samples=20", "--json", str(report), timeout=3600)
        assert evaluation.returncode == 0, evaluation.stderr[-2000:]
        rows = json.loads(report.read_text())["rows"]
        scores[suffix] = {length: sum(r["exact_match"] for r in rows if r["length"] == length
                                      and r["placement"] == "depth") / 10 for length in (192, 3072)}
        worst[suffix] = min(r["exact_match"] for r in rows if r["length"] == 3072 and r["placement"] == "depth")
    assert scores["_baseline"][3072] < 0.3, scores
    assert scores[""][192] > 0.9 and scores[""][3072] > scores["_baseline"][3072] + 0.5, scores
    assert worst[""] >= 0.95, worst


MQAR_STEPS = 1000
FULL_ATTENTION = dict(use_memory=False, segment_length=96, intermediate_size=305, short_conv_carry=False)
TOKENS_MEMORY = dict(segment_length=32, bptt_segments=3, short_conv_carry=False,  # experiment=mqar's model
                     memory=TokensMemoryConfig(slots=64, select_noise=0.0, importance_penalty=0.0))


def first_query_accuracy_after_training(short_conv: int, model_cfg: dict = FULL_ATTENTION,
                                        steps: int = MQAR_STEPS, threads: int = 1) -> float:
    """A 2-layer, 64-wide model (`model_cfg`: the full-attention backbone of experiment=mqar_full by default, no
    memory, one 96-token segment) trained on one-character keys, 1-8 pairs, 32-token segments of pairs, noise and
    queries, for `steps` steps at a constant learning rate -> the accuracy of the first query at 4 pairs (no
    elimination can help it; recalling only the set of values gives 1/4). Run in a spawned process: it sets the
    thread count (1: two of these side by side on the 2-core CI machine)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TitanConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, short_conv=short_conv, **model_cfg)
    model = TitanModel(cfg)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3))  # constant learning rate

    def batch(stream: int, index: int, n: int, pairs=None):
        samples = []
        for i in range(n):
            rng = sample_rng(1, stream, index + i)
            p = pairs or int(rng.integers(1, 9))  # the layout of 32-token segments: pairs, noise, queries
            samples.append(make_mqar(rng, 97, p, 32, 1, "train", key_length=1))
        return samples

    for step in range(steps):
        pairs = [s.training_pair() for s in batch(0, step * 16, 16)]
        loss = model(torch.stack([p[0] for p in pairs]), labels=torch.stack([p[1] for p in pairs])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    samples = batch(1, 0, 64, pairs=4)
    tokens = torch.stack([torch.from_numpy(s.tokens) for s in samples])
    first = samples[0].targets[0][0]  # the value after the first query key (same place in every sample)
    with torch.no_grad():
        predicted = model(tokens[:, :first]).logits[:, -1].argmax(-1)
    return (predicted == tokens[:, first]).float().mean().item()


@pytest.mark.slow
def test_short_conv_lets_the_backbone_learn_associative_recall():
    """model.short_conv=4 (each token carries its 3 predecessors into attention) turns MQAR from a task this
    backbone barely learns into one it solves: measured with exactly this test's setting (2026-12-02, the 2-core
    machine, 71 s for the two side by side), the first query at 4 pairs after 1,000 steps: 1.00 with the
    convolution, 0.28 without (after 1,500 steps: 1.00 and 0.31)."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        with_conv, without = pool.map(first_query_accuracy_after_training, (4, 0))
    assert without < 0.6, (with_conv, without)
    assert with_conv > 0.9, (with_conv, without)


TOKENS_STEPS = 700


@pytest.mark.slow
def test_the_tokens_memory_recalls_pairs_across_a_segment_of_noise():
    """experiment=mqar's model (memory_read=tokens, short_conv=4, segments of 32): the pairs lie two segments
    before the queries, so only the memory can answer (a segment-local model sees none of them); the first query at
    4 pairs after TOKENS_STEPS steps. Measured with this model, data and seeds in a /tmp script at one thread (the
    test runs two) beside three other runs (2026-12-02, the 2-core machine): 0.89 after 500 steps, 0.98 after
    600, 1.00 after 700 and at every 100 steps to 1,300; in CI the test passes (dcf833f)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        accuracy = pool.submit(first_query_accuracy_after_training, 4, TOKENS_MEMORY, TOKENS_STEPS, 2).result()
    assert accuracy > 0.9, accuracy
