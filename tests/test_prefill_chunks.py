"""InferenceEngine reads a long prompt in calls of `prefill_tokens` tokens that carry the state: the same logits, state
and generated tokens as one call over the whole prompt (exactly, in fp32), and no call holds more than one chunk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from support import kind_config, tiny_model
from ltm_core import inference
from ltm_core.inference import InferenceConfig, InferenceEngine, prefill_tokens

GREEDY = InferenceConfig(temperature=0, stop_at_eos=False)


class _Calls(torch.nn.Module):
    """Records the tokens of each model call (the engine reads `config` through it)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls, self.config = model, [], model.config

    def forward(self, input_ids, memory=None, labels=None):
        self.calls.append(input_ids.shape[1])
        return self.inner(input_ids, memory=memory, labels=labels)


def _same_state(a, b) -> None:
    assert (a.offset, a.segments) == (b.offset, b.segments)
    ta, tb = a.tensors(), b.tensors()
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert torch.equal(x, y)


# every memory kind (the layer-major kinds: tokens, delta, the neural memory's mag; segment by segment: slots, the
# neural memory's mac), several windows per pass, and the memory-less baseline
CASES = [("tokens", {}), ("tokens", {"windows_per_pass": 3}), ("slots", {}), ("delta", {"windows_per_pass": 2}),
         ("neural", {}), ("neural_mag", {}), ("tokens", {"use_memory": False})]


@pytest.mark.parametrize("kind, changes", CASES, ids=[f"{k}-{'-'.join(map(str, c.values())) or 'default'}"
                                                      for k, c in CASES])
def test_chunked_prefill_equals_one_pass(kind, changes, monkeypatch):
    cfg = kind_config(kind, **changes)
    model = tiny_model(cfg, perturb=True).eval()
    monkeypatch.setattr(inference, "PREFILL_TOKENS", 100)  # a few chunks of a short prompt
    step = prefill_tokens(cfg)
    unit = cfg.segment_length * cfg.bptt_segments * cfg.windows_per_pass
    assert step % unit == 0 and step >= unit
    T = 3 * step + cfg.segment_length + 5  # ends inside a segment
    prompt = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = model(prompt)
    spy = _Calls(model)
    engine = InferenceEngine(spy, GREEDY)
    out = engine.prefill(prompt)
    assert spy.calls == [step, step, step, T - 3 * step]  # no call reads more than one chunk
    assert torch.equal(out.logits, whole.logits[:, 3 * step:])
    _same_state(out.memory, whole.memory)
    # greedy generation after the prompt: the tokens of generation from the one-pass state
    n = 2 * cfg.segment_length + 3
    tokens, state, logits = [], whole.memory, whole.logits[:, -1]
    with torch.inference_mode():
        for _ in range(n):
            token = logits.argmax(-1)
            tokens.append(token)
            step_out = model(token.unsqueeze(1), memory=state)
            state, logits = step_out.memory, step_out.logits[:, -1]
    generated = InferenceEngine(model, GREEDY).generate(prompt, n)
    assert torch.equal(generated, torch.cat([prompt, torch.stack(tokens, 1)], dim=1))


def test_prefill_chunk_is_whole_passes_of_the_model():
    """About PREFILL_TOKENS tokens, a whole number of layer-major passes, at least one pass."""
    tiny = kind_config("tokens", segment_length=64, bptt_segments=4, windows_per_pass=6)  # model=tiny: 1,536 a pass
    assert prefill_tokens(tiny) == 3072
    large = kind_config("tokens", segment_length=1024, bptt_segments=8)  # a pass longer than PREFILL_TOKENS
    assert prefill_tokens(large) == 8192


def test_short_prompt_is_one_call_and_uncached_mode_is_unchanged():
    cfg = kind_config("tokens")
    model = tiny_model(cfg).eval()
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    for cache, calls in ((True, [40, 1, 1]), (False, [40, 41, 42])):
        spy = _Calls(model)
        config = dataclasses.replace(GREEDY, use_memory_cache=cache)
        InferenceEngine(spy, config).generate(prompt, 3)
        assert spy.calls == calls
