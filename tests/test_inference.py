"""Generation: KV-cached + memory-carrying generation equals full recomputation; bounded state; sampling."""

from __future__ import annotations


import pytest
import torch

from support import kind_config, tiny_model
from ltm_core.inference import InferenceConfig, InferenceEngine, sample
from ltm_core.tokenizer import ByteTokenizer


@pytest.mark.parametrize("kind", ["tokens", "slots", "delta"])
def test_cached_generation_equals_uncached_recomputation(kind):
    tiny_cfg = kind_config(kind)
    model = tiny_model(tiny_cfg, perturb=True).eval()
    prompt = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    n = 3 * tiny_cfg.segment_length + 7  # crosses several segment boundaries
    cached = InferenceEngine(model, InferenceConfig(temperature=0, stop_at_eos=False)).generate(prompt, n)
    ids = prompt
    with torch.no_grad():
        for _ in range(n):  # no cache, no carried state: the whole sequence every step
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_generation_state_is_bounded(tiny_cfg):
    model = tiny_model(tiny_cfg).eval()
    S = tiny_cfg.segment_length
    out = model(torch.randint(0, 256, (1, 3)))
    sizes = set()
    for _ in range(10 * S):
        out = model(out.logits[:, -1:].argmax(-1), memory=out.memory)
        state = out.memory
        assert state.offset < S
        sizes.add(state.nbytes)
    C, M, K, L = tiny_cfg.hidden_size, tiny_cfg.memory.slots, tiny_cfg.short_conv, tiny_cfg.num_hidden_layers
    # per layer: M kept tokens, the current segment's keys, values and pending entries, the convolution's carry
    assert max(sizes) <= 4 * L * (M * C + (S - 1) * 3 * C + (K - 1) * C)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    assert int(sample(logits, InferenceConfig(temperature=0), None)) == 3
    top1 = {int(sample(logits, InferenceConfig(temperature=1.0, top_k=1), g)) for _ in range(20)}
    assert top1 == {3}
    top2 = {int(sample(logits, InferenceConfig(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert top2 == {2, 3}
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    nucleus = {int(sample(probs.log(), InferenceConfig(temperature=1.0, top_p=0.75), g)) for _ in range(300)}
    assert nucleus == {0, 1}  # 0.5 + 0.3 reaches 0.75
    with pytest.raises(ValueError):
        InferenceConfig(top_p=1.5)


def test_seeded_sampling_is_reproducible(tiny_cfg):
    model = tiny_model(tiny_cfg)
    prompt = torch.tensor([[256, 72, 105]])
    runs = [InferenceEngine(model, InferenceConfig(seed=5, stop_at_eos=False)).generate(prompt, 20)
            for _ in range(2)]
    assert torch.equal(*runs)


def test_byte_tokenizer_roundtrip_and_streaming_utf8():
    tok = ByteTokenizer()
    text = "In the beginning — naïve ✓"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == text
    decode = tok.stream_decoder()
    assert "".join(decode(i) for i in ids) == text
    decode = tok.stream_decoder()  # the output stops inside a character: its bytes still show, as U+FFFD
    cut = list("a✓".encode())[:-1]
    assert "".join(decode(i) for i in cut) == "a" and decode(None) == "\ufffd" and decode(None) == ""


class _Calls(torch.nn.Module):
    """Records what each model call reads: (tokens, whether a state was passed)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, []

    def forward(self, input_ids, memory=None, labels=None):
        self.calls.append((input_ids.shape[1], memory is not None))
        return self.inner(input_ids, memory=memory, labels=labels)


def test_use_memory_cache_false_rereads_the_sequence_and_gives_the_same_tokens(tiny_cfg):
    model = tiny_model(tiny_cfg).eval()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    n = 2 * tiny_cfg.segment_length + 3  # across segment boundaries
    runs = {}
    for cache in (True, False):
        spy = _Calls(model)
        config = InferenceConfig(temperature=0, stop_at_eos=False, use_memory_cache=cache)
        runs[cache] = (InferenceEngine(spy, config).generate(prompt, n), spy.calls)
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1] == [(5, False)] + [(1, True)] * (n - 1)  # the prompt, then one token on the carried state
    assert runs[False][1] == [(5 + i, False) for i in range(n)]  # the whole sequence every time, no state


def test_max_sequence_length_bounds_prompt_plus_output(tiny_cfg):
    model = tiny_model(tiny_cfg).eval()
    prompt = torch.tensor([[256, 72, 105, 33]])
    limit = InferenceConfig(temperature=0, stop_at_eos=False, max_sequence_length=11)
    assert InferenceEngine(model, limit).generate(prompt, 100).shape == (1, 11)
    unlimited = InferenceEngine(model, InferenceConfig(temperature=0, stop_at_eos=False)).generate(prompt, 7)
    assert torch.equal(InferenceEngine(model, limit).generate(prompt, 100), unlimited)
    assert InferenceEngine(model, InferenceConfig(max_sequence_length=4)).generate(prompt, 5).shape == (1, 4)
    with pytest.raises(ValueError, match="prompt has 4 tokens, more than max_sequence_length=3"):
        InferenceEngine(model, InferenceConfig(max_sequence_length=3)).generate(prompt, 5)
    with pytest.raises(ValueError, match="max_sequence_length"):
        InferenceConfig(max_sequence_length=0)
