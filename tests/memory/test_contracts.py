"""The model's contracts, for every memory kind and for the model of every shipped recipe and preset.

- causality across segment boundaries: changing token t changes no logit before t;
- streaming split anywhere == one call (the state carries everything);
- gradients reach an earlier segment inside a BPTT window, and not across one;
- the layer-major window pass == the segment-by-segment reference (values and gradients, fp32, in training with
  the write noise on).

Recipes and presets are discovered from conf/, so a new one cannot skip these. Their models are shrunk (width,
depth, segment and memory sizes) but keep their memory kind and options.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ltm_core import TitanConfig, TitanModel
from ltm_core.configuration import compose, model_config
from support import KIND_MEMORY, assert_causal, assert_streaming_equals_one_call, ids, kind_config, tiny_model

CONF = Path(__file__).resolve().parents[2] / "conf"
RECIPES = sorted(f"experiment={p.stem}" for p in (CONF / "experiment").glob("*.yaml"))
PRESETS = sorted(f"model={p.stem}" for p in (CONF / "model").glob("*.yaml"))


def shrunk(override: str) -> TitanConfig:
    """The model a recipe or preset composes, at test size: 32 wide, 2 layers, segments of 8, at most 6 slots."""
    cfg = model_config(compose([override]))
    memory = cfg.memory
    sizes = {"slots": min(memory.slots, 6)}
    if hasattr(memory, "dim"):
        sizes["dim"] = 8
    if getattr(memory, "heads", None):
        sizes["heads"] = 2
    return dataclasses.replace(cfg, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, segment_length=8,
                               bptt_segments=2, kernels="torch", compile=False, activation_checkpointing=False,
                               intermediate_size=None if cfg.intermediate_size is None else 48,
                               memory=dataclasses.replace(memory, **sizes))


CASES = {**{f"kind={k}": (lambda k=k: kind_config(k)) for k in KIND_MEMORY},
         **{name: (lambda name=name: shrunk(name)) for name in RECIPES + PRESETS}}


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request) -> tuple[str, TitanConfig]:
    return request.param, CASES[request.param]()


def test_every_recipe_and_preset_is_covered():
    assert len(RECIPES) >= 10 and {"model=tiny", "model=small", "model=base", "model=large"} <= set(PRESETS)
    assert {f"experiment={n}" for n in ("passkey", "passkey_long", "mqar", "babi_facts")} <= set(RECIPES)


def test_causal_across_segment_boundaries(case):
    name, cfg = case
    model = tiny_model(cfg, perturb=True).eval()
    S = cfg.segment_length
    assert_causal(model, ids(5 * S + 3), (0, S - 1, S, S + 1, 2 * S + 5, 4 * S),
                  reaches_from=3 * S if cfg.use_memory else None)


def test_streaming_split_anywhere_equals_one_call(case):
    name, cfg = case
    model = tiny_model(cfg, perturb=True).eval()
    S = cfg.segment_length
    tokens = ids(7 * S + 5)
    assert_streaming_equals_one_call(model, tokens, (3, 5, 1, S, 2 * S + 1, 7))
    assert_streaming_equals_one_call(model, tokens, (S, S, 3 * S))  # whole segments, then whole windows


def test_gradients_reach_an_earlier_segment_inside_a_window_only(case):
    """bptt_segments=2: a loss on segment 1 reaches segment 0 (the same window) through the memory; a loss on
    segment 2 (the next window) reaches neither, also when both windows run in one pass (`windows_per_pass=2`).
    Without memory no loss reaches another segment. (Evaluation mode:
    the training-only importance penalty is applied by every backward that passes through its window, whatever the
    loss, so it would blur what the read itself carries.)"""
    name, cfg = case
    S = cfg.segment_length
    model = tiny_model(dataclasses.replace(cfg), perturb=True).eval()
    tokens = ids(3 * S)
    for segment, reaches, per_pass in ((1, cfg.use_memory, 1), (2, False, 1), (2, False, 2)):
        model.config.windows_per_pass = per_pass  # 2: both windows in one layer-major pass
        embeds = []
        handle = model.embed_tokens.register_forward_hook(lambda m, a, out: out.retain_grad() or embeds.append(out))
        model.zero_grad()
        model(tokens).logits[:, segment * S:(segment + 1) * S].square().sum().backward()
        handle.remove()
        grad = embeds[0].grad
        assert (grad[:, :S].abs().amax() > 0) == reaches, (name, segment)
        if segment == 2:
            assert grad[:, :2 * S].abs().amax() == 0, name


def test_window_parallel_equals_the_sequential_reference(case):
    """The layer-major pass and the segment-by-segment path, from the same seed: the same logits, loss, auxiliary
    loss and gradients (training mode, so the tokens memory's write noise is drawn, once per window), with one BPTT
    window per pass, two (windows of 3 and 3 segments, then 1 and 3 tokens) and three (3, 3 and 1 segments, then 3
    tokens): gradients stop between them. The tokens memory also with its writes' compiled CPU loop
    (`model.kernels=auto`, ltm_core/memory/choice.py) in both orders."""
    name, cfg = case
    cfg = dataclasses.replace(cfg, bptt_segments=3)
    S = cfg.segment_length
    tokens = ids(7 * S + 3)
    runs = [(False, 1, "torch"), (True, 1, "torch"), (True, 2, "torch"), (True, 3, "torch")]
    if cfg.memory.kind == "tokens":
        runs += [(False, 1, "auto"), (True, 3, "auto")]
    results = []
    for parallel, per_pass, kernels in runs:
        model = tiny_model(dataclasses.replace(cfg, windows_per_pass=per_pass, kernels=kernels), perturb=True).train()
        model.window_parallel = parallel
        torch.manual_seed(5)
        out = model(tokens, labels=tokens)
        loss = out.loss + (0 if out.aux_loss is None else 0 * out.aux_loss)
        loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    for result in results[1:]:
        _assert_same_step(result, results[0])


def _assert_same_step(mine: tuple, reference: tuple) -> None:
    (par, par_grads), (seq, seq_grads) = mine, reference
    torch.testing.assert_close(par.logits, seq.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(par.loss, seq.loss, rtol=0, atol=1e-6)
    assert (par.aux_loss is None) == (seq.aux_loss is None)
    if par.aux_loss is not None:
        torch.testing.assert_close(par.aux_loss, seq.aux_loss, rtol=1e-6, atol=1e-6)
    assert par_grads.keys() == seq_grads.keys()
    for n in par_grads:
        torch.testing.assert_close(par_grads[n], seq_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    for mine, ref in zip(par.memory.tensors(), seq.memory.tensors()):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)


def test_kinds_that_write_their_own_read_run_segment_by_segment():
    """The slots memory writes the block's output, and the neural memory's mac the output of the attention that read
    its retrieved tokens: both depend on their own read, so they cannot take the layer-major order, and the model
    runs them segment by segment whatever `window_parallel` says."""
    for kind in ("slots", "neural"):
        assert not TitanModel(kind_config(kind)).blocks[0].memory.window_parallel
    for kind in ("tokens", "delta", "neural_mag", "neural_mal"):
        assert TitanModel(kind_config(kind)).blocks[0].memory.window_parallel
