"""The neural memory (ltm_core/memory/neural.py): the chunk-parallel write against the token-by-token Titans rule with
autograd gradients (float64), the three placements' reads against hand references, MAC's order retrieve -> attend
-> update, fp32 updates under bf16 autocast, the state's round trips, and a bounded memory at the defaults."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ltm_core import TitanConfig
from ltm_core.config import NeuralMemoryConfig, memory_config
from ltm_core.layers import rotary_tables
from ltm_core.memory import LayerState, map_state
from support import KIND_MEMORY, assert_streaming_equals_one_call, ids, kind_config, tiny_model


def _config(kind: str = "neural", **options) -> TitanConfig:
    return kind_config(kind, memory=memory_config({**KIND_MEMORY[kind], **options}))


def _mlp(weights, k: torch.Tensor) -> torch.Tensor:
    """M(k) written plainly, per batch element: weights [B, ...], k [B, D] -> [B, D]."""
    if len(weights) == 1:
        return torch.einsum("bij,bj->bi", weights[0], k)
    w1, w2 = weights
    return torch.einsum("bij,bj->bi", w2, F.silu(torch.einsum("bij,bj->bi", w1, k))) / math.sqrt(w1.shape[1])


def _gates(memory, entries: torch.Tensor) -> tuple:
    """entries [B, T, 2D + 3] -> the rule's keys, values (l2-normed) and its step, momentum and decay per token."""
    D = memory.dim
    k = F.normalize(F.silu(entries[..., :D]), dim=-1)
    v = F.normalize(F.silu(entries[..., D:2 * D]), dim=-1)
    theta = memory.config.lr * torch.sigmoid(entries[..., 2 * D])
    return k, v, theta, torch.sigmoid(entries[..., 2 * D + 1]), torch.sigmoid(entries[..., 2 * D + 2])


def naive_write(memory, state: tuple, entries: torch.Tensor, chunk: int) -> tuple:
    """The Titans rule token by token, each gradient by autograd at the weights of its chunk's start (chunk 1: at
    the previous token's weights, the rule itself):
    S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||^2,  M_t = (1 - alpha_t) M_{t-1} + S_t."""
    n = len(memory.initial)
    k, v, theta, eta, alpha = _gates(memory, entries)
    weights, momenta = list(state[:n]), list(state[n:])
    for t in range(entries.shape[1]):
        if t % chunk == 0:
            anchor = [w.detach().clone().requires_grad_() for w in weights]
        loss = (_mlp(anchor, k[:, t]) - v[:, t]).square().sum()  # the batch elements' weights are separate
        grads = torch.autograd.grad(loss, anchor)
        scale = lambda x: x[:, t].view(-1, 1, 1)  # noqa: E731
        momenta = [scale(eta) * s - scale(theta) * g for s, g in zip(momenta, grads)]
        weights = [(1 - scale(alpha)) * w + s for w, s in zip(weights, momenta)]
    return tuple(weights + momenta)


def _random_write(kind: str, seed: int = 0, T: int = 16, **options):
    """A float64 memory, a random state (momenta too) and random entries whose gate logits span (0, 1) widely."""
    memory = tiny_model(_config(kind, **options), perturb=True).blocks[0].memory.double()
    g = torch.Generator().manual_seed(seed)
    B, D = 3, memory.dim
    state = tuple(torch.randn(B, *w.shape, generator=g, dtype=torch.float64) * 0.3 for w in memory.initial) * 2
    entries = torch.randn(B, T, 2 * D + 3, generator=g, dtype=torch.float64)
    entries[..., 2 * D:] *= 3
    return memory, state, entries


@pytest.mark.parametrize("kind", ["neural", "neural_mal"])  # an MLP (depth 2) and a linear map (depth 1)
def test_chunk_1_is_the_token_by_token_rule(kind):
    memory, state, entries = _random_write(kind, chunk=1)
    with torch.no_grad():
        fast = memory.write(state, entries).state
    for mine, ref in zip(fast, naive_write(memory, state, entries, chunk=1)):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["neural", "neural_mal"])
@pytest.mark.parametrize("chunk", [4, 5, 16, 40])  # 5: a shorter last chunk; 40: one chunk for the segment
def test_a_chunk_takes_its_gradients_at_its_start_weights(kind, chunk):
    """The chunk-parallel form (one batched gradient and the cumulative-product scan per chunk) == the token loop
    with every gradient of a chunk at the chunk's start weights; and it is an approximation, not the rule."""
    memory, state, entries = _random_write(kind, chunk=chunk)
    with torch.no_grad():
        fast = memory.write(state, entries).state
    for mine, ref in zip(fast, naive_write(memory, state, entries, chunk=chunk)):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10)
    exact = naive_write(memory, state, entries, chunk=1)
    assert max((a - b).abs().max() for a, b in zip(fast, exact)) > 1e-4


def test_the_write_is_differentiable_as_the_token_rule():
    """The analytic gradient inside the write is differentiated by the model's backward like the autograd one:
    the gradients of a loss on the written state w.r.t. the entries and the start state agree (float64)."""
    memory, state, entries = _random_write("neural", T=6, chunk=1)
    grads = []
    for write in (lambda s, e: memory.write(s, e).state,
                  lambda s, e: naive_write_graph(memory, s, e)):
        s = tuple(t.clone().requires_grad_() for t in state)
        e = entries.clone().requires_grad_()
        out = write(s, e)
        sum((o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view_as(o)).sum() for o in out).backward()
        grads.append([e.grad, *(t.grad for t in s)])
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-8, atol=1e-10)


def naive_write_graph(memory, state, entries):
    """`naive_write` at chunk 1 whose autograd gradients stay in the graph (create_graph), for second derivatives."""
    n = len(memory.initial)
    k, v, theta, eta, alpha = _gates(memory, entries)
    weights, momenta = list(state[:n]), list(state[n:])
    for t in range(entries.shape[1]):
        loss = (_mlp(weights, k[:, t]) - v[:, t]).square().sum()
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        scale = lambda x: x[:, t].view(-1, 1, 1)  # noqa: E731
        momenta = [scale(eta) * s - scale(theta) * g for s, g in zip(momenta, grads)]
        weights = [(1 - scale(alpha)) * w + s for w, s in zip(weights, momenta)]
    return tuple(weights + momenta)


def test_a_written_key_reads_back_toward_its_value():
    """One token written into the initial (empty) memory: reading its key returns its value scaled by the step,
    and an orthogonal key reads much less (the memory is associative)."""
    memory = tiny_model(_config("neural_mal", chunk=1, lr=0.5)).blocks[0].memory.double()
    D = memory.dim
    key, other = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    key[0], other[1] = 1.0, 1.0
    value = torch.rand(D, dtype=torch.float64) + 0.5
    entries = torch.zeros(1, 1, 2 * D + 3, dtype=torch.float64)
    entries[0, 0, :D] = 20 * key  # silu(20) ~ 20: the normalised key is `key`
    entries[0, 0, D:2 * D] = value
    entries[0, 0, 2 * D:] = torch.tensor([30.0, -30.0, -30.0])  # theta = lr, no momentum, no decay
    state = memory.write(memory.initial_state(1), entries).state
    w = state[0][0]  # the linear map, from zero: 2 theta v k^T
    torch.testing.assert_close(w @ key, 2 * 0.5 * F.normalize(F.silu(value), dim=0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w @ other, torch.zeros(D, dtype=torch.float64), rtol=0, atol=1e-9)


def test_the_update_runs_in_fp32_under_bf16_autocast():
    memory, state, entries = _random_write("neural", chunk=4)
    memory = memory.float()
    state, entries = map_state(state, torch.Tensor.float), entries.bfloat16()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = memory.write(state, entries).state
        plain = memory.write(state, entries.float()).state
    for a, b in zip(mixed, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- reads
def _retrieve_by_hand(memory, state, q: torch.Tensor) -> torch.Tensor:
    """W_o M(normalize(silu(q))) for the batch element 0."""
    k = F.normalize(F.silu(q), dim=-1)  # [N, D]
    weights = [w[0].unsqueeze(0).expand(k.shape[0], *w.shape[1:]) for w in state[:len(memory.initial)]]
    return memory.out(_mlp(weights, k))


def _state(memory, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, *w.shape, generator=g) for w in memory.initial) * 2


def test_mac_prefixes_the_attention_with_persistent_and_retrieved_tokens():
    cfg = _config("neural")
    memory = tiny_model(cfg, perturb=True).blocks[0].memory
    state = _state(memory)
    tokens = memory.prefix(state).tokens
    assert tokens.shape == (2, 2 + 4, cfg.hidden_size)  # persistent=2, retrieved=4
    torch.testing.assert_close(tokens[0, :2], memory.persistent, rtol=0, atol=0)
    retrieved = memory.retrieved_norm(_retrieve_by_hand(memory, state, memory.queries))
    torch.testing.assert_close(tokens[0, 2:], retrieved, rtol=1e-5, atol=1e-6)


def test_mac_retrieves_then_attends_then_updates_with_the_attention_output():
    """Segment by segment: each segment's attention reads exactly the prefix of the memory written by the segments
    before it (retrieve), and each write is the segment's state after that attention (update)."""
    cfg = dataclasses.replace(_config("neural"), short_conv=0, short_conv_carry=False)
    model = tiny_model(cfg, perturb=True).eval()
    block, S = model.blocks[0], cfg.segment_length
    assert not block.memory.window_parallel
    seen = {"prefix": [], "x": [], "a": [], "entries": []}
    block.attn.register_forward_pre_hook(lambda m, args: seen["prefix"].append(args[4].tokens))
    block.attn_norm.register_forward_hook(lambda m, args, out: seen["x"].append(args[0]))
    block.attn.register_forward_hook(lambda m, args, out: seen["a"].append(out[0]))
    model.register_write_hook(lambda layer, entries, kept: layer == 0 and seen["entries"].append(entries))
    tokens = ids(3 * S)
    states = [model.initial_state(2)]
    for i in range(3):
        states.append(model(tokens[:, i * S:(i + 1) * S], memory=states[-1]).memory)
    for i in range(3):
        torch.testing.assert_close(seen["prefix"][i], block.memory.prefix(states[i].layers[0].memory).tokens,
                                   rtol=0, atol=0)
        torch.testing.assert_close(seen["entries"][i], block.memory.entries(seen["x"][i] + seen["a"][i]),
                                   rtol=0, atol=0)
    # and the whole input in one call reads and writes the same
    torch.testing.assert_close(model(tokens).memory.layers[0].memory[0], states[3].layers[0].memory[0],
                               rtol=0, atol=1e-6)


def test_mac_writes_depend_on_its_own_read():
    """What a MAC segment writes is the attention's output, which read the memory: two memories, two writes (the
    reason MAC runs segment by segment)."""
    cfg = _config("neural")
    block = tiny_model(cfg, perturb=True).blocks[0].eval()
    S = cfg.segment_length
    x = torch.randn(1, S, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_tables(torch.arange(S), cfg.head_dim, cfg.rope_theta)
    outs = [block(x, cos, sin, LayerState(tuple(t[:1] for t in _state(block.memory, seed)))) for seed in (1, 2)]
    assert (outs[0][3] - outs[1][3]).abs().amax() > 1e-4


@pytest.mark.parametrize("kind", ["neural_mag", "neural_mal"])
def test_mag_and_mal_write_the_blocks_input_whatever_the_memory_holds(kind):
    cfg = _config(kind)
    block = tiny_model(cfg, perturb=True).blocks[0].eval()
    assert block.memory.window_parallel
    S = cfg.segment_length
    x = torch.randn(1, S, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_tables(torch.arange(S), cfg.head_dim, cfg.rope_theta)
    outs = [block(x, cos, sin, LayerState(tuple(t[:1] for t in _state(block.memory, seed)))) for seed in (1, 2)]
    torch.testing.assert_close(outs[0][3], outs[1][3], rtol=0, atol=0)  # the entries
    assert (outs[0][0] - outs[1][0]).abs().amax() > 1e-4  # the block's output does read the memory


def test_mag_is_a_gated_residual_after_the_attention():
    """read(h) = sigmoid(W_g n) * W_o M*(W_q n), n = norm(h); a closed gate reads nothing, an open one all."""
    cfg = _config("neural_mag")
    memory = tiny_model(cfg, perturb=True).blocks[0].memory
    state = _state(memory)
    h = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    n = memory.read_norm(h)
    full = torch.stack([_retrieve_by_hand(memory, tuple(s[b:b + 1] for s in state), memory.query(n[b]))
                        for b in range(2)])
    torch.testing.assert_close(memory.read(h, state), torch.sigmoid(memory.gate(n)) * full, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        memory.gate.weight.zero_()
        for bias, expected in ((-60.0, torch.zeros_like(full)), (60.0, full)):
            memory.gate.bias.fill_(bias)
            torch.testing.assert_close(memory.read(h, state), expected, rtol=1e-5, atol=1e-6)
    assert memory.read_before(h, state) is None and memory.prefix(state) is None  # no persistent tokens


def test_mal_is_a_layer_before_the_attention():
    """The attention reads norm(x + W_o M*(W_q norm(x))), beside the persistent tokens; no read after it."""
    cfg = dataclasses.replace(_config("neural_mal"), short_conv=0, short_conv_carry=False)
    block = tiny_model(cfg, perturb=True).blocks[0].eval()
    memory, S = block.memory, cfg.segment_length
    state = tuple(t[:1] for t in _state(memory))
    x = torch.randn(1, S, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_tables(torch.arange(S), cfg.head_dim, cfg.rope_theta)
    seen = {}
    block.attn.register_forward_pre_hook(lambda m, args: seen.update(h=args[0], prefix=args[4]))
    block(x, cos, sin, LayerState(state))
    layer = x + _retrieve_by_hand(memory, state, memory.query(block.attn_norm(x))[0])
    torch.testing.assert_close(seen["h"], block.attn_norm(layer), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["prefix"].tokens[0], memory.persistent, rtol=0, atol=0)
    assert memory.read(x, state) is None


# ---------------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("kind", ["neural", "neural_mag"])
def test_the_state_survives_save_and_restore(kind, tmp_path):
    """A state cut mid-segment, detached, moved to float64 and back, saved and loaded: the continuation equals one
    call (the state is the MLP's weights and momenta, a tuple of tensors)."""
    cfg = _config(kind)
    model = tiny_model(cfg, perturb=True).eval()
    S = cfg.segment_length
    tokens = ids(4 * S + 3)
    full = model(tokens)
    first = model(tokens[:, :S + 5]).memory
    assert [t.shape for t in first.layers[0].memory] == [(2, *w.shape) for w in model.blocks[0].memory.initial] * 2
    restored = first.detach().to(torch.float64).to(torch.float32)
    torch.save(restored, tmp_path / "state.pt")
    restored = torch.load(tmp_path / "state.pt", weights_only=False)
    rest = model(tokens[:, S + 5:], memory=restored)
    torch.testing.assert_close(torch.cat([model(tokens[:, :S + 5]).logits, rest.logits], 1), full.logits,
                               rtol=0, atol=1e-5)
    for mine, ref in zip(rest.memory.tensors(), full.memory.tensors()):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)


def test_the_memory_stays_bounded_at_the_defaults():
    """The chunk form sums a chunk's gradients at one set of weights, so a chunk of identical keys takes `chunk`
    times the step: at the default lr, depth and chunk a constant input (the worst case) keeps the memory bounded."""
    cfg = TitanConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, segment_length=32,
                      bptt_segments=2, kernels="torch", memory=NeuralMemoryConfig(placement="mag"))
    model = tiny_model(cfg).eval()
    for token in (32, 101):
        with torch.no_grad():
            state = model(torch.full((1, 32 * 30), token)).memory
        assert max(w.abs().max() for w in state.layers[0].memory) < 10


def test_streaming_equals_one_call_with_a_ragged_chunk():
    """chunk 5 does not divide the 16-token segment: streaming and the window pass still agree with one call."""
    model = tiny_model(_config("neural_mag"), perturb=True).eval()
    assert_streaming_equals_one_call(model, ids(5 * 16 + 3), (7, 16, 9, 32))


def test_flops_count_the_write_and_the_read():
    for kind, reads in (("neural", 4 / 16), ("neural_mag", 1.0)):
        memory = tiny_model(_config(kind)).blocks[0].memory
        p = 2 * 16 * 8
        assert memory.flops_per_token(16) == pytest.approx(3 * (6 * p + 2 * p * reads) - 6 * p)
