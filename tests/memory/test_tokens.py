"""The tokens memory (ltm_core/memory/tokens.py): what the write keeps, how the ranking learns, and the read
through the self-attention's own projections."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from ltm_core.attention import attention
from ltm_core.config import TokensMemoryConfig
from ltm_core.layers import rotary_tables
from support import ids, kind_config, spy_cpu_kernels, tiny_model


def _memory(noise: float = 0.0, slots: int = 8, **options):
    """Layer 0's tokens memory whose importance is a token's first channel."""
    cfg = kind_config("tokens", memory=TokensMemoryConfig(slots=slots, select_noise=noise, **options))
    memory = tiny_model(cfg).blocks[0].memory
    with torch.no_grad():
        memory.importance.weight.zero_()
        memory.importance.weight[0, 0] = 1.0
        memory.importance.bias.zero_()
    return memory, cfg


def _ranked(memory, cfg):
    """Candidates of rising importance (3 apart end to end), the second channel their index: M entries, S tokens."""
    M, S, C = memory.slots, cfg.segment_length, cfg.hidden_size
    tokens = torch.zeros(1, M + S, C)
    tokens[0, :, 0] = torch.linspace(0.1, 3, M + S)
    tokens[0, :, 1] = torch.arange(M + S).float()
    return tokens[:, :M], tokens[:, M:]


def _index(mem: torch.Tensor) -> list[int]:
    return mem[0, :, 1].round().long().tolist()


def test_the_write_keeps_the_most_important_tokens_whatever_follows():
    """Tokens more important than everything that arrives later stay in memory, bit for bit, in arrival order."""
    memory, cfg = _memory()
    memory.eval()
    S, C = cfg.segment_length, cfg.hidden_size
    needle = torch.randn(1, S, C, generator=torch.Generator().manual_seed(0))
    needle[0, :, 0] = torch.linspace(-1, 1, S)
    needle[0, :3, 0] = 10.0  # three important tokens
    mem = memory.write(memory.initial_state(1), needle).state
    for i in range(50):  # many segments of filler, all less important
        mem = memory.write(mem, torch.randn(1, S, C, generator=torch.Generator().manual_seed(i)).clamp(-3, 3)).state
    held = [int((mem[0] == row).all(-1).nonzero().item()) for row in needle[0, :3]]
    assert held == sorted(held)  # the needle's tokens, in the order they came


def test_empty_slots_lose_to_any_token_and_are_masked_out_of_the_read(tiny_cfg):
    """Before its first write the model is exactly its no-memory twin (the empty slots read nothing); the first
    segment's tokens then take the empty slots."""
    model = tiny_model(tiny_cfg, perturb=True).eval()
    twin = tiny_model(dataclasses.replace(tiny_cfg, use_memory=False)).eval()
    loaded = twin.load_state_dict(model.state_dict(), strict=False)
    assert not loaded.missing_keys and all(".memory.importance." in k for k in loaded.unexpected_keys)
    S = tiny_cfg.segment_length
    tokens = ids(2 * S)
    # the twin restarts its convolution at each segment; with the memory it is carried: equal on the first segment
    torch.testing.assert_close(model(tokens[:, :S]).logits, twin(tokens[:, :S]).logits, rtol=0, atol=1e-6)
    assert model.num_parameters() - twin.num_parameters() == tiny_cfg.num_hidden_layers * (tiny_cfg.hidden_size + 1)
    memory = model.blocks[0].memory
    assert memory.empty(memory.initial_state(2)).all()
    assert not memory.empty(model(tokens[:, :S]).memory.layers[0].memory).any()  # M = 8 <= S = 16


def test_the_memory_keeps_tokens_as_the_attention_sees_them(tiny_cfg):
    """Layer 0 keeps the normed block inputs a = norm(x + conv(x)) of the tokens it ranks highest."""
    cfg = dataclasses.replace(tiny_cfg, memory=TokensMemoryConfig(slots=tiny_cfg.segment_length + 4))
    model = tiny_model(cfg, perturb=True).eval()
    S, block = cfg.segment_length, model.blocks[0]
    tokens = ids(S)
    mem = model(tokens).memory.layers[0].memory  # [B, M, C]: 4 empty slots, then the segment in order
    x, _ = block._short_conv(model.embed_tokens(tokens), None)
    torch.testing.assert_close(mem[:, 4:], block.attn_norm(x), rtol=0, atol=0)
    assert block.memory.empty(mem)[:, :4].all()


def test_a_kept_token_is_keyed_as_at_segment_position_zero(tiny_cfg):
    """The slots carry no position: attn.kv(h) gives the key and value the attention computes for h at segment
    position 0 (where the rotation is the identity)."""
    attn, C = tiny_model(tiny_cfg).blocks[0].attn, tiny_cfg.hidden_size
    h = torch.randn(3, 1, C)
    cos, sin = rotary_tables(torch.zeros(1, dtype=torch.long), tiny_cfg.head_dim, tiny_cfg.rope_theta)
    _, k, v = attn(h, cos, sin, None, None, "torch")  # [3, H, 1, hd]
    k_mem, v_mem = attn.kv(h.transpose(0, 1))  # one batch row holding three slots: [1, H, 3, hd]
    torch.testing.assert_close(k_mem, k.squeeze(2).transpose(0, 1).unsqueeze(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(v_mem, v.squeeze(2).transpose(0, 1).unsqueeze(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("read_importance", [False, True])
def test_a_later_segment_attends_to_the_kept_tokens(tiny_cfg, read_importance):
    """Hand reference of layer 0's read: softmax over [W_k mem ; rope(W_k segment)] with the self-attention's own
    projections, the segment part causal, each kept token's score plus log sigmoid(importance) with
    read_importance."""
    cfg = dataclasses.replace(tiny_cfg, short_conv=0, short_conv_carry=False,
                              memory=TokensMemoryConfig(slots=8, read_importance=read_importance))
    model = tiny_model(cfg, perturb=True).eval()
    S, block, H, hd = cfg.segment_length, model.blocks[0], cfg.num_attention_heads, cfg.head_dim
    tokens = ids(2 * S, batch=1)
    first = model(tokens[:, :S])
    mem = first.memory.layers[0].memory[0]  # [M, C]
    h = block.attn_norm(model.embed_tokens(tokens[0, S:]))  # [S, C]
    q, k, v = block.attn.qkv_proj(h).view(S, 3, H, hd).permute(1, 2, 0, 3)  # [H, S, hd]
    _, km, vm = block.attn.qkv_proj(mem).view(-1, 3, H, hd).permute(1, 2, 0, 3)  # [H, M, hd]
    cos, sin = rotary_tables(torch.arange(S), hd, cfg.rope_theta)
    cos, sin = cos[:, :hd // 2], sin[:, hd // 2:]  # the angles' cosines and sines
    rot = lambda x: torch.cat([x[..., :hd // 2] * cos - x[..., hd // 2:] * sin,
                               x[..., hd // 2:] * cos + x[..., :hd // 2] * sin], -1)
    scores = rot(q) @ torch.cat([km, rot(k)], 1).transpose(1, 2) / hd ** 0.5  # [H, S, M + S]
    if read_importance:
        scores[:, :, :8] += F.logsigmoid(block.memory.importance(mem).squeeze(-1))
    scores[:, :, 8:] = scores[:, :, 8:].masked_fill(torch.ones(S, S).triu(1).bool(), -torch.inf)
    y = (scores.softmax(-1) @ torch.cat([vm, v], 1)).transpose(0, 1).reshape(S, -1)  # [S, C]
    captured = {}
    block.attn.o_proj.register_forward_hook(lambda mod, args, out: captured.update(y=out))  # the attention's output
    model(tokens[:, S:], memory=first.memory)
    torch.testing.assert_close(captured["y"][0], block.attn.o_proj(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, backend", [(torch.float32, "auto"), (torch.float32, "torch"),
                                            (torch.bfloat16, "auto")], ids=str)
def test_the_kept_keys_and_values_are_those_of_the_kept_tokens(tiny_cfg, dtype, backend, monkeypatch):
    """`SelfAttention.project_with_kept` (one projection, one autograd node) gives what projecting each segment and
    each segment's kept tokens apart gives: rotated queries, [kept keys; rotated segment keys], [kept values;
    segment values], and the same gradients to the segments, the held tokens and the projection's weight (batch 2:
    each batch element's rows number its own [held tokens; segments]). In float32 on CPU through the compiled pass
    (`ltm_core.cpu_kernels`) and through the PyTorch ops (`model.kernels=torch`, as on GPUs); in bfloat16 (PyTorch's
    ops) against the same computed in float32, to within bfloat16's rounding of the largest value."""
    from ltm_core.layers import apply_rotary, gather_rows, rotary_positions
    from ltm_core.model import SelfAttention

    calls = spy_cpu_kernels(monkeypatch, "kept_rows_forward", "kept_rows_backward")

    torch.manual_seed(0)
    attn = SelfAttention(tiny_cfg)
    B, W, S, M, R, C = 2, 3, 8, 5, 10, tiny_cfg.hidden_size
    h = torch.randn(B * W, S, C, requires_grad=True)
    tokens = torch.randn(B, R, C, requires_grad=True)
    rows = torch.stack([torch.randperm(R + W * S)[:M].sort().values for _ in range(B * W)]).view(B, W, M)
    cos, sin = rotary_positions(S, tiny_cfg.head_dim, tiny_cfg.rope_theta, h.device)
    q, k, v = attn.project(h)  # [B W, H, S, hd]
    kept = gather_rows(torch.cat([tokens, h.view(B, W * S, C)], dim=1), rows.flatten(1)).view(B * W, M, C)
    pk, pv = attn.kv(kept)  # [B W, H, M, hd]
    want = (apply_rotary(q, cos, sin), torch.cat([pk, apply_rotary(k, cos, sin)], 2), torch.cat([pv, v], 2))
    grads = [torch.randn_like(t) for t in want]
    inputs = (h, tokens, attn.qkv_proj.weight)
    want_grads = torch.autograd.grad(want, inputs, grads)
    attn.to(dtype)
    low = [t.detach().to(dtype).requires_grad_() for t in (h, tokens)]
    got = attn.project_with_kept(*low, rows, cos, sin, backend)
    assert all(t.is_contiguous() and t.dtype == dtype for t in got)  # the read views them as [B W H, L, hd]
    got_grads = torch.autograd.grad(got, (*low, attn.qkv_proj.weight), [g.to(dtype) for g in grads])
    assert calls == (["kept_rows_forward", "kept_rows_backward"] if (dtype, backend) == (torch.float32, "auto")
                     else [])
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        scale = 1.0 if dtype == torch.float32 else 2 ** -7 * b.abs().max().item()  # bfloat16: 8 significant bits
        torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5 * scale if dtype == torch.float32 else 2 * scale)


def test_the_kept_read_in_one_node_equals_its_two_nodes(tiny_cfg, monkeypatch):
    """On CPU in float32 `SelfAttention.read_kept` runs the kept keys and values and the explicit-scores read after
    them as one autograd node (`_KeptRead`, whose backward makes the projections' and the prefix's gradients in one
    compiled pass: `cpu_kernels.kept_rows_backward` given the read): the same output and gradients (the segments, the
    held tokens, both projections' weights, the prefix's score bias and straight-through weight) as the two nodes it
    replaces, in PyTorch's ops (`model.kernels=torch`); batch 2, with an empty slot."""
    from ltm_core.layers import rotary_positions
    from ltm_core.memory import Prefix
    from ltm_core.memory.tokens import EMPTY_SLOT_SCORE
    from ltm_core.model import SelfAttention, _KeptRead

    calls = spy_cpu_kernels(monkeypatch, "kept_rows_forward", "kept_rows_backward")
    applied = []
    monkeypatch.setattr(_KeptRead, "apply", lambda *a, fn=_KeptRead.apply: applied.append(1) or fn(*a))
    torch.manual_seed(0)
    attn = SelfAttention(tiny_cfg)
    B, W, S, M, R, C = 2, 3, 8, 5, 10, tiny_cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    h, tokens, dy = torch.randn(B * W * S, C, generator=g), torch.randn(B, R, C, generator=g), torch.randn(
        B * W * S, C, generator=g)  # the segments' tokens flat, as the layer-major pass gives them
    rows = torch.stack([torch.randperm(R + W * S, generator=g)[:M].sort().values for _ in range(B * W)]).view(B, W, M)
    bias, through = torch.randn(B * W, M, generator=g), torch.rand(B * W, M, generator=g)
    bias[1, 2] = EMPTY_SLOT_SCORE
    cos, sin = rotary_positions(S, tiny_cfg.head_dim, tiny_cfg.rope_theta, h.device)

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in (h, tokens, bias, through)]
        y = attn.read_kept(leaves[0], leaves[1], rows, cos, sin, Prefix(None, leaves[2], leaves[3]), backend)
        return [y, *torch.autograd.grad(y, [*leaves, attn.qkv_proj.weight, attn.o_proj.weight], dy)]

    got, want = run("auto"), run("torch")
    assert applied == [1] and calls == ["kept_rows_forward", "kept_rows_backward"]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[3].abs().sum() > 0 and got[4].abs().sum() > 0  # the bias and the weight learn


def _kept_gradient(attn, backend: str) -> torch.Tensor:
    """The projection weight's gradient through `project_with_kept` on fixed inputs (batch 1, 3 segments of 8)."""
    g = torch.Generator().manual_seed(0)
    C, hd = attn.qkv_proj.in_features, attn.head_dim
    h, tokens = torch.randn(3, 8, C, generator=g), torch.randn(1, 5, C, generator=g)
    rows = torch.stack([torch.randperm(5 + 8 * w, generator=g)[:5].sort().values for w in range(3)])[None]
    cos, sin = rotary_tables(torch.arange(8), hd, 10000.0)
    attn.zero_grad()
    out = attn.project_with_kept(h, tokens, rows, cos, sin, backend)
    sum((t * torch.randn(t.shape, generator=g)).sum() for t in out).backward()
    return attn.qkv_proj.weight.grad.clone()


def _forked_kept_gradient(attn, queue) -> None:
    torch.set_num_threads(1)  # as a data loader's worker
    queue.put(_kept_gradient(attn, "auto").numpy())  # (a tensor would travel in shared memory, gone with the process)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX's")
def test_a_forked_process_builds_the_kept_keys_and_values_with_pytorchs_ops(tiny_cfg):
    """OpenMP threads (Numba's, as PyTorch's) hang or abort in a process forked from one that ran them: a forked
    process (a data loader's worker) builds the read's inputs with PyTorch's ops instead of the compiled pass, and
    gets the same gradient."""
    import multiprocessing

    from ltm_core.model import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(tiny_cfg)
    want = _kept_gradient(attn, "auto")  # the compiled pass: Numba's threads started here
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_kept_gradient, args=(attn, queue))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, f"the forked process {'hung' if child.exitcode is None else 'failed'}"
    torch.testing.assert_close(torch.from_numpy(queue.get(timeout=10)), want, rtol=1e-5, atol=1e-6)


def test_select_dedup_keeps_a_needle_against_any_number_of_copies_of_a_stronger_token():
    """A periodic haystack repeats its best-ranked filler token: without select_dedup, copies of it push the
    needle's weaker tokens out; with it, the copies after the first rank below every distinct entry."""
    for dedup in (None, 0.97):
        memory, cfg = _memory(select_dedup=dedup)
        memory.eval()
        M, S, C = memory.slots, cfg.segment_length, cfg.hidden_size
        g = torch.Generator().manual_seed(0)
        needle = torch.randn(1, S, C, generator=g).clamp(-3, 3)
        needle[0, :4, 0] = torch.tensor([9.0, 8.0, 5.0, 4.0])  # two strong tokens, two weak ones
        mem = memory.write(memory.initial_state(1), needle).state
        strong = torch.randn(C, generator=g)
        strong[0] = 6.0  # the filler's best token: above the needle's weak tokens
        for i in range(3 * M // 2):  # segments of filler, each with one copy of the strong token (perturbed)
            filler = torch.randn(1, S, C, generator=g).clamp(-3, 3)
            filler[0, i % S] = strong + 1e-4 * torch.randn(C, generator=g)
            mem = memory.write(mem, filler).state
        held = [bool((mem[0] == row).all(-1).any()) for row in needle[0, :4]]
        copies = int((F.cosine_similarity(mem[0], strong.expand(M, C), dim=-1) > 0.99).sum())
        if dedup is None:
            assert held == [True, True, False, False] and copies == M - 2
        else:
            assert held == [True, True, True, True] and copies == 1


def test_select_noise_samples_in_training_and_ranks_exactly_in_evaluation():
    """Training ranks importance + select_noise * std * Gumbel (Gumbel-top-k sampling): less important entries are
    sometimes kept, the more important ones more often; evaluation keeps the exact top M, in arrival order."""
    memory, cfg = _memory(noise=1.0)
    mem, segment = _ranked(memory, cfg)
    M, n = memory.slots, memory.slots + cfg.segment_length
    top = list(range(n - M, n))
    memory.eval()
    assert _index(memory.write(mem, segment).state) == top
    memory.train()
    counts = torch.zeros(n)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        kept = memory.write(mem, segment, torch.empty(1, n).exponential_(generator=g)).state
        index = _index(kept)
        assert index == sorted(index) and len(set(index)) == M  # arrival order, no repeats
        counts[index] += 1
    assert counts[:n - M].sum() > 0 and counts[n - M:].sum() < 300 * M  # sampled, not the exact top M
    assert counts[n - M:].sum() > counts[:M].sum() * 3  # the most important kept far more often than the least
    model = tiny_model(kind_config("tokens")).train()
    assert model.blocks[0].memory.noise_shape(2, 16) == (2, 8 + 16)
    assert tiny_model(kind_config("tokens", memory=TokensMemoryConfig(slots=8, select_noise=0))).blocks[0].memory \
        .noise_shape(2, 16) is None


def test_the_importance_penalty_is_the_writes_aux_loss_in_training_only(tiny_cfg):
    """importance_penalty = lambda: a write's aux loss is lambda * mean sigmoid(w . token) over the segment (the
    write's value unchanged; evaluation adds nothing); with importance_detach its gradient reaches the importance
    weights only. The model adds the aux of every write a later read of its window uses to the gradient, and
    reports their sum as `aux_loss`."""
    for detach in (True, False):
        memory, cfg = _memory(importance_penalty=0.7, importance_detach=detach)
        g = torch.Generator().manual_seed(0)
        mem = torch.randn(2, 8, cfg.hidden_size, generator=g)
        segment = torch.randn(2, cfg.segment_length, cfg.hidden_size, generator=g, requires_grad=True)
        write = memory.train().write(mem, segment)
        expected = 0.7 * torch.sigmoid(memory.importance(segment.detach()).squeeze(-1)).mean()
        torch.testing.assert_close(write.aux, expected)
        plain = memory.eval().write(mem, segment)
        assert plain.aux is None
        torch.testing.assert_close(plain.state, write.state, rtol=0, atol=0)
        write.aux.backward()
        assert memory.importance.weight.grad.abs().sum() > 0
        assert (segment.grad is None) == detach
    cfg = dataclasses.replace(tiny_cfg, bptt_segments=3,
                              memory=TokensMemoryConfig(slots=8, select_noise=0.0, importance_penalty=0.7))
    model = tiny_model(cfg, perturb=True).train()
    S = cfg.segment_length
    tokens = ids(3 * S)
    seen = []
    model.register_write_hook(lambda layer, entries, kept: seen.append((layer, entries)))
    out = model(tokens)
    writes = {l: [e for layer, e in seen if layer == l] for l in range(2)}  # each layer's writes, in order
    assert [len(w) for w in writes.values()] == [3, 3]
    # writes 0 and 1 of each layer are read later in the window; write 2 ends it and is not counted
    counted = sum(0.7 * torch.sigmoid(model.blocks[l].memory.importance(writes[l][i]).squeeze(-1)).mean()
                  for l in range(2) for i in range(2))
    torch.testing.assert_close(out.aux_loss, counted, rtol=1e-5, atol=1e-6)


def test_the_read_teaches_the_ranking_through_the_kept_tokens(tiny_cfg):
    """The ranking itself has no gradient: the importance learns from the reads, through each kept token's
    straight-through factor 1 + s - s.detach() and read_importance's score bias."""
    for read_importance in (False, True):
        cfg = dataclasses.replace(tiny_cfg, memory=TokensMemoryConfig(slots=8, importance_penalty=0.0,
                                                                      select_noise=0.0,
                                                                      read_importance=read_importance))
        model = tiny_model(cfg, perturb=True).train()
        S = cfg.segment_length
        tokens = ids(2 * S)
        labels = torch.full_like(tokens, -100)
        labels[:, S:] = tokens[:, S:]  # the loss on the second segment only
        embeds = []
        model.embed_tokens.register_forward_hook(lambda m, a, out: out.retain_grad() or embeds.append(out))
        model(tokens, labels=labels).loss.backward()
        assert embeds[0].grad[:, :S].abs().sum() > 0  # through the kept tokens
        assert model.blocks[0].memory.importance.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scores", ["explicit", "fused"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_key_through_gives_the_gradients_of_the_straight_through_factor(with_bias, scores, monkeypatch):
    """attention(key_through=s) == the attention over the first Lb keys and values times 1 + s - s.detach(): the
    same output, and the same gradients to q, k, v, s and the key bias; on CPU both with the scores written out
    (`_ExplicitScores`, this read's size) and through SDPA's kernel (`_straight_through`)."""
    import ltm_core.attention as A

    if scores == "fused":
        monkeypatch.setattr(A, "MATH_MAX_SCORES", 0)
    torch.manual_seed(0)
    B, H, Lq, Lb, hd = 2, 3, 5, 4, 8
    leaves = [torch.randn(B, H, Lq, hd), torch.randn(B, H, Lb + Lq, hd), torch.randn(B, H, Lb + Lq, hd),
              torch.rand(B, Lb), torch.randn(B, Lb)]
    target = torch.randn(B, H, Lq, hd)

    def grads(explicit: bool):
        q, k, v, s, bias = (t.clone().requires_grad_() for t in leaves)
        kw = {"prefix_len": Lb, "key_bias": bias if with_bias else None}
        if explicit:
            factor = F.pad(1 + (s - s.detach()), (0, Lq), value=1.0)[:, None, :, None]  # [B, 1, Lb + Lq, 1]
            y = attention(q, k * factor, v * factor, **kw)
        else:
            y = attention(q, k, v, key_through=s, **kw)
        ((y - target) ** 2).sum().backward()
        return [y.detach()] + [t.grad for t in (q, k, v, s)] + ([bias.grad] if with_bias else [])

    for got, want in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grads(False)[4].abs().sum() > 0  # s learns


@pytest.mark.parametrize("read_importance", [True, False], ids=["read_importance", "plain_read"])
@pytest.mark.parametrize("windows", [(3,), (1, 2)], ids=["one_window", "held_over"])
@pytest.mark.parametrize("penalty, detach", [(0.0, False), (0.5, False), (0.5, True)], ids=["none", "penalty", "detach"])
@pytest.mark.parametrize("reads_only", [False, True], ids=["all_outputs", "reads_only"])
def test_the_compiled_scan_gives_pytorchs_values_and_gradients(penalty, detach, windows, read_importance,
                                                               reads_only, monkeypatch):
    """A scan in float32 on CPU (`TokensMemory._scan_compiled`: the compiled loop's choices, then
    `cpu_kernels.scan_forward` / `_backward`, spied) gives what its PyTorch ops (`model.kernels=torch`) give: the
    choices, each segment's read prefix (score bias with empty slots, straight-through weight), the state after it,
    the writes' penalty and the rows the read takes keys and values from, and the gradients of the state, the entries,
    w and b through all of them; with rows held over from an earlier window (their gradient to w and b only), the
    penalty with and without importance_detach, and rows held many times (batch 2, noise); also when the state after
    and the rows take no gradient (`reads_only`, as in training, where both are detached)."""
    calls = spy_cpu_kernels(monkeypatch, "scan_forward", "scan_backward")
    memory, cfg = _memory(noise=0.5, slots=8, importance_penalty=penalty, importance_detach=detach,
                          read_importance=read_importance)
    memory.train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        memory.importance.weight.copy_(torch.randn(memory.importance.weight.shape, generator=g))
        memory.importance.bias.fill_(0.3)
    B, W, S, C, M = 2, sum(windows), cfg.segment_length, cfg.hidden_size, memory.slots
    state, entries = torch.randn(B, M, C, generator=g), torch.randn(B, W, S, C, generator=g)
    state[:, M // 2:] = 0  # empty slots
    noise = torch.empty(W, B, M + S).exponential_(generator=g)

    def run(kernels):
        memory.model_config = dataclasses.replace(cfg, kernels=kernels)
        x, e = state.clone().requires_grad_(), entries.clone().requires_grad_()
        scan = memory.scan_windows(x, e, noise, windows)
        prefix = memory.scan_prefix(scan)
        assert (scan.aux is None) == (penalty == 0)
        # the state's rows among the held-over ones, with its gradient (the compiled scan lists the later windows'
        # tokens once each, the reference as often as they are held: compared by the memories they make)
        state_rows = scan.row_tokens[:, :M]
        outs = [o for o in (prefix.bias, prefix.through, scan.aux) + (() if reads_only else (scan.after, state_rows))
                if o is not None]
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        params = (x, e, memory.importance.weight, memory.importance.bias)
        before = memory.states_before(scan) if scan.rows is not None else None
        return [scan.kept, before, *[o.detach() for o in outs], *torch.autograd.grad(loss, params)]

    got, want = run("auto"), run("torch")
    assert calls == ["scan_forward", "scan_backward"]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[-1].abs().sum() > 0 and got[-4].abs().sum() > 0  # the bias learns, and the state


@pytest.mark.parametrize("slots", [8, 24])  # fewer slots than a segment's 16 tokens, and more (empty slots stay)
@pytest.mark.parametrize("options", [{"noise": 0.5, "select_dedup": 0.95}, {"noise": 0.0}], ids=["noise", "exact"])
def test_scan_makes_the_choices_of_one_write_per_segment(options, slots):
    """The layer-major recurrence: the memories before each segment and after the last, the kept indices and the
    aux losses equal those of W calls of `write`, with the same noise, also with equal ranks and over two BPTT
    windows."""
    memory, cfg = _memory(importance_penalty=1.0, slots=slots, **options)
    memory.train()
    g = torch.Generator().manual_seed(3)
    B, W, S, C, M = 2, 4, cfg.segment_length, cfg.hidden_size, memory.slots
    entries = torch.randn(B, W, S, C, generator=g)
    entries[:, 2, :3] = entries[:, 1, :3]  # exact repeats across segments, for the suppression
    entries[:, 0, 5] = entries[:, 0, 4]  # ... and inside a segment
    entries[:, 3, 0, 0] = entries[:, 0, 7, 0]  # the same rank, another token
    noise = torch.empty(W, B, M + S).exponential_(generator=g) if options["noise"] else None
    for windows in ((W,), (2, 2)):
        state = memory.initial_state(B)
        scan = memory.scan_windows(state, entries, noise, windows)
        assert scan.before is None  # not gathered: the read takes importance, empty slots and rows apart
        before = memory.states_before(scan).view(B, W, M, C)
        for i in range(W):
            torch.testing.assert_close(before[:, i], state, rtol=0, atol=0)
            write = memory.write(state, entries[:, i], None if noise is None else noise[i])
            assert torch.equal(scan.kept[:, i], write.kept), (windows, i)
            torch.testing.assert_close(scan.aux[i], write.aux)
            state = write.state
        torch.testing.assert_close(scan.after, state, rtol=0, atol=0)


@pytest.mark.parametrize("slots", [8, 24])
@pytest.mark.parametrize("noise", [0.5, 0.0], ids=["noise", "exact"])
def test_the_compiled_choice_makes_the_reference_choices(noise, slots):
    """On CPU the writes' loop runs compiled (ltm_core/memory/choice.py; `model.kernels=auto`): over five writes in
    a row, from a memory half of empty slots and with an all-zero token (an empty slot once held), it holds and
    keeps what the PyTorch loop does (`model.kernels=torch`), with and without the training noise."""
    reference, cfg = _memory(noise=noise, slots=slots)
    compiled = tiny_model(dataclasses.replace(cfg, kernels="auto")).blocks[0].memory
    compiled.load_state_dict(reference.state_dict())
    reference.train(), compiled.train()
    g = torch.Generator().manual_seed(0)
    B, W, S, C, M = 3, 5, cfg.segment_length, cfg.hidden_size, slots
    pool = torch.randn(B, M + W * S, C, generator=g)
    pool[:, M // 2:M] = 0  # empty slots
    pool[1, M + 2] = 0
    pool[1, M + 2 + S, 0] = 50.0  # kept ahead of everything
    noise_samples = torch.empty(W, B, M + S).exponential_(generator=g) if noise else None
    held, keeps, empty = compiled.choose(pool, S, noise_samples)
    want_held, want_keeps, want_empty = reference.choose(pool, S, noise_samples)
    assert held.shape == (B, W + 1, M) and keeps.shape == (B, W, M)
    assert torch.equal(held, want_held) and torch.equal(keeps, want_keeps) and torch.equal(empty, want_empty)
    assert torch.equal(empty, (pool.gather(1, held.flatten(1)[..., None].expand(-1, -1, C)) == 0).all(-1).view_as(held))
    assert empty[:, 0, M // 2:].all() and not empty[:, 0, :M // 2].any()  # the empty slots before the first write
    assert (held[1, 1:] == M + 2 + S).sum() == W - 1  # the strong token, from its write on
    assert not ((held[:, 1:] >= M // 2) & (held[:, 1:] < M)).any()  # the empty slots go at the first write


def test_the_compiled_choice_takes_half_precision_pools_and_noise():
    """A bfloat16 model's pool (and noise) reach the compiled loop as float32 (exact): the choices are those the
    PyTorch loop makes from the same bfloat16 values."""
    reference, cfg = _memory(noise=0.5, slots=8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every channel ranks: no two bfloat16 rows tie
        reference.importance.weight.copy_(torch.randn(reference.importance.weight.shape, generator=g))
    compiled = tiny_model(dataclasses.replace(cfg, kernels="auto")).blocks[0].memory
    compiled.load_state_dict(reference.state_dict())
    reference.train(), compiled.train()
    B, W, S, M = 2, 3, cfg.segment_length, 8
    pool = torch.randn(B, M + W * S, cfg.hidden_size, generator=g).bfloat16()
    noise = torch.empty(W, B, M + S).exponential_(generator=g).bfloat16()
    held, keeps, _ = compiled.choose(pool, S, noise)
    want_held, want_keeps, _ = reference.choose(pool, S, noise)
    assert torch.equal(held, want_held) and torch.equal(keeps, want_keeps)


def test_the_compiled_choice_keeps_the_earlier_of_equal_candidates():
    """Of candidates with equal ranks the compiled loop keeps the earlier (the memory's entries before the segment's
    tokens, earlier tokens before later ones); PyTorch's topk breaks ties in no stated order."""
    _, cfg = _memory(slots=8)
    memory = tiny_model(dataclasses.replace(cfg, kernels="auto")).blocks[0].memory
    with torch.no_grad():
        memory.importance.weight.zero_()
    memory.eval()
    S, M, C = cfg.segment_length, 8, cfg.hidden_size
    pool = torch.randn(2, M + 3 * S, C, generator=torch.Generator().manual_seed(1))  # every rank the bias
    held, _, _ = memory.choose(pool, S, None)
    assert torch.equal(held, torch.arange(M).expand(2, 4, M))
    pool[:, :M] = 0  # empty slots: the first segment's first M tokens take them, then hold
    held, _, _ = memory.choose(pool, S, None)
    assert torch.equal(held[:, 1:], (M + torch.arange(M)).expand(2, 3, M))


def test_the_compiled_choice_ranks_a_nan_token_last():
    """A token whose rank is NaN (a diverged model's) is kept only if nothing else is left: every write still keeps
    M distinct candidates, the best of the others."""
    _, cfg = _memory(slots=8)
    memory = tiny_model(dataclasses.replace(cfg, kernels="auto")).blocks[0].memory.eval()
    S, M, C = cfg.segment_length, 8, cfg.hidden_size
    pool = torch.randn(2, M + 2 * S, C, generator=torch.Generator().manual_seed(3))
    pool[:, M + 1, 0] = float("nan")
    held, keeps, _ = memory.choose(pool, S, None)
    ranks = memory.ranks(pool)
    for b in range(2):
        for i in range(1, 3):
            rows = held[b, i]
            assert len(set(rows.tolist())) == M and (M + 1) not in rows.tolist()
        # the first write: the M best of [the memory; segment 1] without the NaN token
        candidates = torch.cat([torch.arange(M), M + torch.arange(S)])
        finite = candidates[~ranks[b, candidates].isnan()]
        want = finite[ranks[b, finite].topk(M).indices].sort().values
        assert torch.equal(held[b, 1], want)


def test_the_compiled_choice_runs_where_numba_cannot_cache_it(monkeypatch):
    """Numba refuses `cache=True` where it finds no writable place (a read-only install without a writable home):
    the loop is then compiled for the process alone, and makes the same choices."""
    import numba

    from ltm_core import cpu_kernels
    from ltm_core.memory import choice

    njit, calls = numba.njit, []

    def refusing(*args, **kwargs):
        calls.append(kwargs.get("cache", False))
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function '_choose': no locator available")
        return njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", refusing)
    monkeypatch.setattr(cpu_kernels, "choose_loop", cpu_kernels.compiled(cpu_kernels._choose,
                                                                          fastmath=cpu_kernels.REASSOCIATE))
    pool = torch.randn(2, 8 + 3 * 16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # the importance: a row's first channel
    held, keeps, _ = choice.choose(pool[:, :8], pool[:, 8:], weight, torch.zeros(1, dtype=torch.float64), None, 0.0,
                                   1e4, 16)
    assert calls[:2] == [True, False]  # (numba compiles some of its own functions through njit too)
    want = [pool[b, :8 + 16, 0].topk(8).indices.sort().values for b in range(2)]  # the first write: the top 8
    assert torch.equal(held[:, 1], torch.stack(want))


@pytest.mark.parametrize("windows", [(4, 4, 4, 4), (1, 4, 3), (2, 2)], ids=str)
def test_the_compiled_window_rows_match_the_reference(windows, monkeypatch):
    """A scan over several BPTT windows numbers the rows each memory holds (which it reads with their gradient, and
    where each sits among the rows held at its window's start or the scanned tokens): on CPU compiled
    (`TokensMemory.window_rows` -> `choice.window_rows`), elsewhere (`model.kernels=torch`) in PyTorch, the same
    numbers from the same choices (noisy ones, from a memory half of empty slots)."""
    memory, cfg = _memory(noise=0.5, slots=8)
    memory.train()
    g = torch.Generator().manual_seed(3)
    B, W, S, M = 2, sum(windows), cfg.segment_length, 8
    pool = torch.randn(B, M + W * S, cfg.hidden_size, generator=g)
    pool[:, M // 2:M] = 0
    kept, _, _ = memory.choose(pool, S, torch.empty(W, B, M + S).exponential_(generator=g))
    calls = spy_cpu_kernels(monkeypatch, "window_rows_loop")
    memory.model_config = dataclasses.replace(cfg, kernels="auto")
    own, rows, later = memory.window_rows(kept, S, windows)  # on CPU: the compiled loop
    assert calls == ["window_rows_loop"]
    memory.model_config = dataclasses.replace(cfg, kernels="torch")
    want_own, want_rows, want_later = memory.window_rows(kept, S, windows)
    assert calls == ["window_rows_loop"]  # the reference: PyTorch's ops
    assert own.dtype == torch.bool and rows.dtype == torch.int64 and later.dtype == torch.int64
    assert torch.equal(own, want_own)
    assert own[:, :windows[0] + (len(windows) == 1)].all()  # the first window reads everything with its gradient

    def pool_rows(rows, later):  # the pool row each held row names in [the state's M rows; later; the segments]
        return torch.cat([torch.arange(M).expand(B, M), later, M + torch.arange(W * S).expand(B, W * S)],
                         dim=1).gather(1, rows.flatten(1)).view_as(rows)

    assert torch.equal(pool_rows(rows, later), kept[:, :W]) and torch.equal(pool_rows(want_rows, want_later),
                                                                            kept[:, :W])
    assert (rows < M + later.shape[1]).any() and (rows >= M + later.shape[1]).any()  # held over, and own tokens
    for b in range(B):  # the compiled loop lists each scanned token held at a later window's start once, ascending
        tokens = want_later[b][want_later[b] >= M].unique()
        assert torch.equal(later[b, :len(tokens)], tokens) and not later[b, len(tokens):].any()
    if len(windows) > 2:
        assert later.shape[1] < want_later.shape[1]  # tokens held at several windows' starts


def test_flops_count_the_read_of_the_kept_tokens(tiny_cfg):
    model = tiny_model(tiny_cfg)
    C, M, S, L = tiny_cfg.hidden_size, 8, tiny_cfg.segment_length, tiny_cfg.num_hidden_layers
    n = model.num_parameters()
    expected = 6 * n + 12 * L * C * S + L * (12 * C * M + 6 * 3 * C * C * M / (S * tiny_cfg.bptt_segments))
    assert model.flops_per_token(seq_len=4 * S) == pytest.approx(expected, rel=1e-12)


def test_the_window_index_is_made_once_per_windows_and_device():
    """The scan's window bookkeeping: each window's first segment and each segment's window (the state after the
    last one in the last window), made once per (windows, device) and reused (on CUDA a tensor made from a list
    waits for the GPU's queued work)."""
    from ltm_core.memory.tokens import window_index

    starts, window = window_index((3, 4, 4), torch.device("cpu"))
    assert starts.tolist() == [0, 3, 7] and window.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    again = window_index((3, 4, 4), torch.device("cpu"))
    assert again[0] is starts and again[1] is window
