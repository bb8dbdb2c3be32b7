"""TitanModel: causality, streaming, memory flow, truncated BPTT, baselines, construction switches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from support import ids as _ids, kind_config, spy_cpu_kernels, tiny_model
from ltm_core import TitanModel
from ltm_core.attention import attention, attention_mask
from ltm_core.training import window_span, windowed_backward
from ltm_core.layers import gather_rows, rotary_tables


def test_memory_state_api(tiny_cfg):
    model = tiny_model(tiny_cfg)
    out = model(_ids(40))
    assert out.logits.shape == (2, 40, tiny_cfg.vocab_size)
    state = out.memory
    assert state.offset == 40 % tiny_cfg.segment_length and state.segments == 2
    assert [m.shape for m in state.memory] == [(2, tiny_cfg.memory.slots, tiny_cfg.hidden_size)] * 2
    assert state.nbytes == sum(t.numel() * 4 for t in state.tensors()) > 0
    detached = state.detach()
    assert all(not m.requires_grad for m in detached.memory)
    half = state.to(torch.float64)
    assert all(m.dtype == torch.float64 for m in half.memory)
    assert all(ls.keys.dtype == torch.float64 for ls in half.layers)


def test_information_reaches_segment_three_only_through_memory(tiny_cfg):
    """Segment 1 content changes segment 3 logits with memory; without memory it cannot."""
    S = tiny_cfg.segment_length
    ids = _ids(3 * S)
    changed = ids.clone()
    changed[:, :S] = (changed[:, :S] + 1) % 256
    for use_memory, reaches in ((True, True), (False, False)):
        model = tiny_model(dataclasses.replace(tiny_cfg, use_memory=use_memory)).eval()
        delta = (model(changed).logits[:, 2 * S:] - model(ids).logits[:, 2 * S:]).abs().amax()
        assert (delta > 1e-6) == reaches, (use_memory, float(delta))


@pytest.mark.parametrize("bptt, reaches", [(3, True), (1, False)])
def test_gradient_flow_through_memory_follows_bptt(tiny_cfg, bptt, reaches):
    S = tiny_cfg.segment_length
    model = tiny_model(dataclasses.replace(tiny_cfg, bptt_segments=bptt))
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    model.embed_tokens.register_forward_hook(keep)
    out = model(_ids(3 * S))
    out.logits[:, 2 * S:].sum().backward()  # a loss on segment 3 only
    grad_segment1 = captured["emb"].grad[:, :S].abs().amax()
    assert (grad_segment1 > 0) == reaches


@pytest.mark.parametrize("per_pass, passes", [(1, 3), (2, 2), (3, 1)])
def test_windowed_backward_matches_one_backward(tiny_cfg, per_pass, passes):
    """One backward per window, per pass of two windows (then one: the rest) or per pass of all three gives the
    gradients of the mean loss over the sequence."""
    ids = _ids(6 * tiny_cfg.segment_length + 1)  # 3 windows of 2 segments
    inputs, labels = ids[:, :-1], ids[:, 1:]
    cfg = dataclasses.replace(tiny_cfg, memory=dataclasses.replace(tiny_cfg.memory, select_noise=0.0),
                              windows_per_pass=per_pass)
    a, b = tiny_model(cfg, perturb=True), tiny_model(cfg, perturb=True)
    calls = []
    loss_a, aux = windowed_backward(a, inputs, labels, lambda loss: calls.append(loss.backward()))
    assert len(calls) == passes
    assert aux is not None and aux > 0  # the importance penalty, reported beside the loss
    out = b(inputs, labels=labels)  # the forward detaches memory between windows too
    out.loss.backward()
    torch.testing.assert_close(loss_a, out.loss.detach(), rtol=1e-6, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_aux_loss_joins_the_gradient_times_the_models_aux_weight(tiny_cfg):
    """The writes' auxiliary losses reach the parameters through the hidden states (`AddLoss`), times `aux_weight`
    (the trainers' accumulation scale): at weight 0.25 the loss's gradients are a quarter of weight 1's."""
    ids = _ids(4 * tiny_cfg.segment_length)
    cfg = dataclasses.replace(tiny_cfg, memory=dataclasses.replace(tiny_cfg.memory, select_noise=0.0))

    def importance_grad(weight):
        model = tiny_model(cfg, perturb=True)
        model.aux_weight = weight
        out = model(ids)
        assert out.aux_loss is not None and out.aux_loss > 0
        (out.logits.sum() * 0).backward()  # only the auxiliary losses give gradients
        return torch.cat([b.memory.importance.weight.grad.flatten() for b in model.blocks])

    full, quarter = importance_grad(1.0), importance_grad(0.25)
    assert full.abs().sum() > 0
    torch.testing.assert_close(quarter, 0.25 * full, rtol=1e-5, atol=1e-8)


def test_a_passs_layout_constants_are_made_once():
    """The per-pass constants are built once per layout and shared: the writes whose aux losses count
    (`counted_writes`, a tensor) and the first token of each token's BPTT window (`window_token_starts`, read-only)."""
    from ltm_core.model import counted_writes, window_token_starts

    cpu = torch.device("cpu")
    assert counted_writes(1, 5, 3, cpu, torch.float32) is counted_writes(1, 5, 3, cpu, torch.float32)
    assert counted_writes(1, 5, 3, cpu, torch.float32).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    starts = window_token_starts((1, 2), 3)
    assert starts is window_token_starts((1, 2), 3) and not starts.flags.writeable
    assert starts.tolist() == [0, 0, 0, 3, 3, 3, 3, 3, 3]


def test_window_span_runs_windows_per_pass_and_the_rest_last(tiny_cfg):
    """Tokens per backward: `windows_per_pass` windows, fewer when the sequence has fewer, the whole sequence
    without a memory (the baselines carry nothing)."""
    cfg = dataclasses.replace(tiny_cfg, segment_length=64, bptt_segments=4, windows_per_pass=6)  # `tiny`'s shape
    assert window_span(cfg, 8192) == 6 * 256  # 32 windows: passes of 6, 6, 6, 6, 6 and 2
    assert window_span(cfg, 1024) == 1024  # 4 windows: one pass
    assert window_span(cfg, 300) == 512  # a partial window counts as one
    assert window_span(dataclasses.replace(cfg, use_memory=False), 8192) == 8192


@pytest.mark.parametrize("batch", [1, 3])
def test_gather_rows_takes_each_batch_elements_rows(batch):
    """gather_rows(pool, rows)[b, r] == pool[b, rows[b, r]], values and gradients (one batch element: no offsets)."""
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(batch, 7, 2, 3, generator=g, requires_grad=True)
    rows = torch.randint(0, 7, (batch, 5), generator=g)
    out = gather_rows(pool, rows)
    want = pool[torch.arange(batch)[:, None], rows]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(out, pool, grad)[0], torch.autograd.grad(want, pool, grad)[0])


class SavedTensorBytes:
    """Live bytes saved for backward by autograd (activation memory), and its peak."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return _Freed(tensor.detach(), size, self)  # detached: holding the output itself would form a cycle

    @staticmethod
    def unpack(holder):
        return holder.tensor


class _Freed:
    def __init__(self, tensor, size, tracker):
        self.tensor, self.size, self.tracker = tensor, size, tracker

    def __del__(self):
        self.tracker.live -= self.size


def _peak_activation_bytes(model, L, windowed):
    ids = _ids(L + 1, batch=1)
    tracker = SavedTensorBytes()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        if windowed:
            windowed_backward(model, ids[:, :-1], ids[:, 1:])
        else:
            model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    return tracker.peak


@pytest.mark.parametrize("per_pass", [1, 2])
def test_peak_training_memory_flat_in_sequence_length(tiny_cfg, per_pass):
    """From 2 to 16 BPTT windows (of 2 segments), run one or two windows per pass: the activations saved for
    backward stay those of one pass, and two windows per pass hold about twice one."""
    model = tiny_model(dataclasses.replace(tiny_cfg, windows_per_pass=per_pass))
    S = tiny_cfg.segment_length
    short, long = (_peak_activation_bytes(model, n * S, windowed=True) for n in (4, 32))
    assert long <= short * 1.05, (short, long)
    # the tracker does see growth when the whole sequence is one backward
    whole = _peak_activation_bytes(model, 32 * S, windowed=False)
    assert whole > 4 * long
    # against one window per pass: the same (per_pass=1), about twice (per_pass=2)
    one = _peak_activation_bytes(tiny_model(tiny_cfg), 32 * S, windowed=True)
    assert 0.8 * per_pass * one < long < 1.2 * per_pass * one, (one, long)


def test_without_memory_is_segment_local_and_full_causal_when_one_segment(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, use_memory=False)
    model = tiny_model(cfg).eval()
    S = cfg.segment_length
    ids = _ids(2 * S)
    changed = ids.clone()
    changed[:, 0] += 1
    # segment-local: segment 2 does not see segment 1
    torch.testing.assert_close(model(changed).logits[:, S:], model(ids).logits[:, S:], rtol=0, atol=0)
    # with segment_length >= L the same weights are a full-causal transformer: compare to a plain reference
    full = tiny_model(dataclasses.replace(cfg, segment_length=2 * S)).eval()
    full.load_state_dict(model.state_dict())
    torch.testing.assert_close(full(ids).logits, _reference_causal_lm(full, ids), rtol=1e-4, atol=1e-5)


def _reference_causal_lm(model: TitanModel, ids: torch.Tensor) -> torch.Tensor:
    """A from-scratch causal transformer forward with the model's weights (naive attention, explicit RoPE)."""
    cfg = model.config
    B, L = ids.shape
    H, hd = cfg.num_attention_heads, cfg.head_dim
    x = model.embed_tokens.weight[ids]
    pos = torch.arange(L, dtype=torch.float32)
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    cos, sin = (pos[:, None] * inv).cos(), (pos[:, None] * inv).sin()

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    mask = torch.ones(L, L).tril().bool()
    for blk in model.blocks:
        h = rms(x, blk.attn_norm.weight)
        q, k, v = (h @ blk.attn.qkv_proj.weight.T).view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + att.transpose(1, 2).reshape(B, L, -1) @ blk.attn.o_proj.weight.T
        h = rms(x, blk.ffn_norm.weight)
        gate, up = (h @ blk.ffn.gate_up_proj.weight.T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ blk.ffn.down_proj.weight.T
    return rms(x, model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("lq, lk, prefix, causal, window", [
    (16, 16, 0, True, None), (5, 16, 0, True, None), (16, 24, 8, True, None), (3, 24, 8, True, None),
    (16, 16, 0, True, 4), (16, 20, 4, True, 3), (7, 9, 0, False, None), (1, 1, 0, True, None)])
def test_attention_dispatch_matches_naive_softmax(lq, lk, prefix, causal, window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (lq, lk, lk))
    mask = attention_mask(lq, lk, causal=causal, prefix_len=prefix, window=window)
    # the rule, stated directly: prefix always; segment key j visible to query i if j <= p and j > p - window
    seg = lk - prefix
    for i in range(lq):
        p = seg - lq + i
        for j in range(lk):
            expect = j < prefix or ((not causal or j - prefix <= p) and (window is None or j - prefix > p - window))
            assert bool(mask[i, j]) == expect
    ref = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf")).softmax(-1) @ v
    out = attention(q, k, v, causal=causal, prefix_len=prefix, window=window, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_meta_device_construction_and_init(tiny_cfg):
    with torch.device("meta"):
        model = TitanModel(tiny_cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert model.lm_head.weight is model.embed_tokens.weight  # tying survives to_empty
    assert all(torch.isfinite(p).all() for p in model.parameters())
    block = model.blocks[0]
    assert torch.equal(block.attn_norm.weight, torch.ones_like(block.attn_norm.weight))
    assert torch.equal(block.memory.importance.bias, torch.zeros(1))
    assert abs(float(block.attn.qkv_proj.weight.std()) - tiny_cfg.init_std) < 0.005
    assert [name for name, _ in model.blocks.named_children()] == ["0", "1"]  # stable names for TP/PP plans


def test_activation_checkpointing_gives_same_gradients(tiny_cfg):
    ids = _ids(2 * tiny_cfg.segment_length + 1)
    grads = []
    for ckpt in (False, True):
        model = tiny_model(dataclasses.replace(tiny_cfg, activation_checkpointing=ckpt))
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compile_switch_matches_eager(tiny_cfg):
    """model.compile runs each window's layer-major step (blocks and memory recurrence) through one compiled function:
    same loss and gradients as eager; the calls that start or end inside a segment stay eager."""
    cfg = dataclasses.replace(tiny_cfg, num_hidden_layers=1, bptt_segments=3,
                              memory=dataclasses.replace(tiny_cfg.memory, select_noise=0.0))
    eager = tiny_model(cfg, perturb=True)
    compiled = tiny_model(dataclasses.replace(cfg, compile=True))
    compiled.load_state_dict(eager.state_dict())
    assert eager._compiled_window is None and compiled._compiled_window is not None
    ids = _ids(3 * cfg.segment_length + 1)
    results = []
    for model in (eager, compiled):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    calls = []
    compiled._compiled_window = lambda x, *args: calls.append(x.shape[1]) or compiled._window_layers(x, *args)
    with torch.no_grad():
        compiled.eval()
        out = compiled(ids[:, :cfg.segment_length + 3])  # one whole segment, then 3 tokens of the next
        compiled(ids[:, cfg.segment_length + 3:2 * cfg.segment_length], memory=out.memory)  # finishes it
    assert calls == [1]  # only the whole segment read from its start went through the compiled step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_backward_is_the_rotations_gradient(dtype):
    """`rotary_backward` (the rotation by the opposite angles) is the gradient autograd takes through
    `apply_rotary`, for a strided input as the attention rotates (a view of the q|k|v projection)."""
    from ltm_core.layers import apply_rotary, rotary_backward

    cos, sin = rotary_tables(torch.arange(16), 8, 10000.0)
    x = torch.randn(2, 16, 3, 4, 8, dtype=dtype)[:, :, 1].transpose(1, 2).requires_grad_()  # [B, H, T, hd] strided
    dy = torch.randn(2, 4, 16, 8, dtype=dtype)
    want, = torch.autograd.grad(apply_rotary(x, cos, sin), x, dy)
    got = rotary_backward(dy, cos, sin)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the same products, summed in another order
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("shape", [(2, 16, 4, 8), (1, 5, 3, 6), (3, 1, 2, 4)], ids=str)  # (B, T, H, hd); T = 1 decodes
def test_rotated_qkv_gives_the_rotated_heads_and_their_gradient(shape, backend, monkeypatch):
    """`rotated_qkv` (the segment attention's q|k|v) gives the projection's heads, q and k rotated by `apply_rotary`,
    and the projection's gradient autograd takes through them; in float32 on CPU through the compiled passes
    (`ltm_core.cpu_kernels`, spied), with `model.kernels=torch` through PyTorch's ops."""
    from ltm_core.layers import apply_rotary, rotated_qkv

    calls = spy_cpu_kernels(monkeypatch, "rotated_qkv_forward", "rotated_qkv_backward")
    B, T, H, hd = shape
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(B, T, 3 * H * hd, generator=g, requires_grad=True)
    cos, sin = rotary_tables(torch.arange(7, 7 + T), hd, 10000.0)  # positions 7.. as a cache's new tokens
    heads = proj.view(B, T, 3, H, hd).permute(0, 2, 3, 1, 4)  # [B, 3, H, T, hd]
    want = (apply_rotary(heads[:, 0], cos, sin), apply_rotary(heads[:, 1], cos, sin), heads[:, 2])
    got = rotated_qkv(proj, cos, sin, H, backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    dy = [torch.randn(B, H, T, hd, generator=g) for _ in range(3)]
    torch.testing.assert_close(torch.autograd.grad(got, proj, dy)[0], torch.autograd.grad(want, proj, dy)[0],
                               rtol=1e-6, atol=1e-6)
    assert calls == (["rotated_qkv_forward", "rotated_qkv_backward"] if backend == "auto" else [])


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("shape", [(2, 37, 24), (1, 1, 8), (3, 4, 5, 16), (2, 5, 1024)], ids=str)  # 1024: float32 sums
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_rms_norm_gives_pytorchs_values_and_gradients(shape, backend, strided, monkeypatch):
    """`ops.rms_norm` (every RMSNorm of the model): `F.rms_norm`'s output and the gradients of x and the weight; in
    float32 on CPU through the compiled passes (`ltm_core.cpu_kernels`, spied), with `model.kernels=torch` through
    PyTorch's op; also for an input and an output gradient whose first two dimensions are transposed views."""
    from ltm_core import ops

    calls = spy_cpu_kernels(monkeypatch, "rms_norm_forward", "rms_norm_backward")
    g = torch.Generator().manual_seed(0)
    swap = (1, 0, *range(2, len(shape)))
    made = (lambda: torch.randn(*[shape[i] for i in swap], generator=g).permute(*swap)) if strided else (
        lambda: torch.randn(*shape, generator=g))
    x = 3 * made()
    x[(0,) * (len(shape) - 1)].mul_(1e-3)  # a row whose mean square is near eps: eps counts
    x.requires_grad_()
    weight = torch.randn(shape[-1], generator=g, requires_grad=True)
    dy = made()
    assert x.is_contiguous() != strided or shape[0] == 1 or shape[1] == 1
    got, want = ops.rms_norm(x, weight, 1e-5, backend), F.rms_norm(x, (shape[-1],), weight, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (x, weight), dy), torch.autograd.grad(want, (x, weight), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls == (["rms_norm_forward", "rms_norm_backward"] if backend == "auto" else [])


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", [(2, 7, 24), (1, 16), (3, 4, 5, 8)], ids=str)
def test_swiglu_gives_pytorchs_values_and_gradient(shape, strided):
    """`ops.swiglu(gate_up)` (every FFN's): silu(gate) * up and the gradient of the packed projection; in float32 on
    CPU one autograd node writing both halves' gradients in place (`ops._SwiGLU`), with `model.kernels=torch`
    PyTorch's three; also from a strided projection and gradient."""
    from ltm_core import ops

    g = torch.Generator().manual_seed(0)
    made = (lambda *s: torch.randn(*s[::-1], generator=g).permute(*range(len(s) - 1, -1, -1))) if strided else (
        lambda *s: torch.randn(*s, generator=g))
    gate_up, dy = 3 * made(*shape[:-1], 2 * shape[-1]), made(*shape)

    def run(backend):
        x = gate_up.clone().requires_grad_() if not strided else gate_up.detach().requires_grad_()
        y = ops.swiglu(x, backend)
        return y, torch.autograd.grad(y, x, dy)[0]

    (got, dgot), (want, dwant) = run("auto"), run("torch")
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(want, F.silu(gate) * up)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dgot, dwant, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_project_chunks_gives_those_columns_of_the_projection(bias):
    """`project_chunks(linear, x, first, chunks)`: the columns of linear(x) from chunk `first` on (q|k|v -> k|v),
    with the gradient of those columns' weights (and bias) only."""
    from ltm_core.layers import project_chunks

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3 * 4, bias=bias)
    x = torch.randn(2, 5, 6)
    got = project_chunks(linear, x, 1, 3)
    torch.testing.assert_close(got, linear(x)[..., 4:])
    got.sum().backward()
    assert linear.weight.grad[:4].eq(0).all() and linear.weight.grad[4:].ne(0).all()
    torch.testing.assert_close(linear.weight.grad[4:], x.flatten(0, 1).sum(0).expand(8, 6))
    if bias:
        torch.testing.assert_close(linear.bias.grad, torch.tensor([0.0] * 4 + [10.0] * 8))


def test_constant_tensors_are_built_once_and_train_after_inference():
    """`constant_tensors` (rotary tables, attention masks, window indices): one build per arguments, shared; a build
    made under inference mode (a generation's) is an ordinary tensor that a training step can save for backward;
    under torch.compile the function is traced, not cached."""
    from ltm_core.layers import constant_tensors, rotary_positions

    builds = []

    @constant_tensors
    def table(n: int, device: torch.device) -> torch.Tensor:
        builds.append(n)
        return torch.arange(n, dtype=torch.float32, device=device)

    cpu = torch.device("cpu")
    with torch.inference_mode():
        made = table(4, cpu)
    assert not made.is_inference() and table(4, cpu) is made and builds == [4]
    assert table(5, cpu) is not made and builds == [4, 5]
    x = torch.ones(4, requires_grad=True)
    (x * made).pow(2).sum().backward()  # `made` saved for backward
    assert torch.equal(x.grad, 2 * made ** 2)
    compiled = torch.compile(lambda y: y * table(6, cpu), backend="eager", fullgraph=True)
    assert torch.equal(compiled(torch.ones(6)), torch.arange(6.0)) and 6 in builds
    cos, sin = rotary_positions(16, 8, 10000.0, cpu)
    assert all(torch.equal(a, b) for a, b in zip((cos, sin), rotary_tables(torch.arange(16), 8, 10000.0)))


@pytest.mark.parametrize("kind", ["tokens", "delta"])
def test_the_window_step_compiles_to_one_graph(kind):
    """No graph breaks in the compiled unit, in training (the tokens memory's noise and penalty), over two BPTT
    windows in one pass: one graph per pass is what lets CUDA graphs (compile_mode=reduce-overhead) replay it."""
    model = tiny_model(kind_config(kind), perturb=True).train()
    S = model.config.segment_length
    state = model.initial_state(2)
    x = model.embed_tokens(_ids(2 * S)).view(2, 2, S, -1)
    cos, sin = rotary_tables(torch.arange(S), model.config.head_dim, model.config.rope_theta)
    noise = model._noise(state, 2, x.device)
    noise = None if noise is None else noise[:2]
    explained = torch._dynamo.explain(model._window_layers)(x, cos, sin, tuple(state.layers), noise, (1, 1))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("mode, copied", [("default", False), ("reduce-overhead", True),
                                           ("max-autotune", True), ("max-autotune-no-cudagraphs", False)])
def test_cuda_graph_outputs_are_copied_out_of_the_pool(tiny_cfg, monkeypatch, mode, copied):
    """A CUDA-graph replay overwrites its previous outputs: with a CUDA-graph mode the window step copies the carried
    state and the window's output out of the compiled call's results (on CPU the graphs themselves are skipped, so
    the copy is checked on what the compiled call returned)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = tiny_model(dataclasses.replace(tiny_cfg, compile=True, compile_mode=mode)).eval()
    returned = []
    model._compiled_window = lambda *args: returned.append(model._window_layers(*args)) or returned[-1]
    state = model.initial_state(2)
    x = model.embed_tokens(_ids(tiny_cfg.segment_length))
    with torch.no_grad():
        h, new = model._window(x, state, 1, [])
    (h0, layers0, _), = returned
    shared = [h.data_ptr() == h0.data_ptr()] + [a.memory.data_ptr() == b.memory.data_ptr()
                                                for a, b in zip(new.layers, layers0)]
    assert shared == [not copied] * len(shared)
    torch.testing.assert_close(h, h0.flatten(1, 2))


def test_compile_mode_reaches_torch_compile(tiny_cfg, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or fn)
    tiny_model(dataclasses.replace(tiny_cfg, compile=True, compile_mode="reduce-overhead"))
    assert modes == ["reduce-overhead"]
    modes.clear()
    tiny_model(dataclasses.replace(tiny_cfg, compile_mode="reduce-overhead"))  # compile=false: mode unused
    assert modes == []


def test_parameter_count_and_flops_formula(tiny_cfg):
    C, Lyr, S, K = tiny_cfg.hidden_size, tiny_cfg.num_hidden_layers, tiny_cfg.segment_length, tiny_cfg.short_conv
    F_ = tiny_cfg.ffn_dim
    per_block = (3 * C * C + C * C) + (2 * C * F_ + F_ * C) + 2 * C + C * K  # attention, SwiGLU, norms, convolution
    backbone = 259 * C + Lyr * per_block + C
    baseline = tiny_model(dataclasses.replace(tiny_cfg, use_memory=False))
    assert baseline.num_parameters() == backbone
    assert baseline.flops_per_token(seq_len=4 * S) == 6 * backbone + 12 * Lyr * C * S
    assert baseline.flops_per_token(seq_len=S // 2) == 6 * backbone + 12 * Lyr * C * S // 2
    slots = tiny_model(kind_config("slots"))
    M, D = 8, 16
    n = backbone + Lyr * (M * D + C + C * D + (D + 1) + 3 * D * D + (2 * D * D + D) + C + 2 * C * C + 2 * C * D)
    assert slots.num_parameters() == n
    expected = 6 * n + 12 * Lyr * C * S + Lyr * (12 * C * M + 12 * M * D + 6 * (2 * C * D) * (M / S - 1))
    assert slots.flops_per_token(seq_len=4 * S) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["tokens", "delta", "neural"])
def test_the_cpu_passes_leave_every_parameter_resizable(kind, monkeypatch):
    """A NumPy view of a tensor marks its storage as not resizable for good; FSDP2 frees the unsharded parameters
    by resizing their storage to 0 (`parallel=fsdp` on CPU failed in backward). The compiled CPU passes read the
    weights through copies: after a training step every parameter's storage still resizes."""
    calls = spy_cpu_kernels(monkeypatch, "rms_norm_forward", "causal_conv_forward", "rms_norm_backward")
    model = tiny_model(kind_config(kind, kernels="auto"), perturb=True).train()
    tokens = _ids(2 * model.config.segment_length * model.config.bptt_segments + 1)
    windowed_backward(model, tokens[:, :-1], tokens[:, 1:])
    assert {"rms_norm_forward", "causal_conv_forward", "rms_norm_backward"} <= set(calls)  # the passes ran
    for name, p in model.named_parameters():
        storage = p.untyped_storage()
        storage.resize_(storage.nbytes())  # raises for a storage marked not resizable


@pytest.mark.parametrize("tied", [True, False])
def test_the_runs_parameter_count_counts_a_tied_embedding_once(tied):
    """`ltm train`'s count (the machine check, the native-parallel runs' banner), made on the meta device, is the
    built model's: a tied embedding and output head are one matrix."""
    from ltm_core.configuration import compose, model_config
    from ltm_core.train import parameter_count

    cfg = compose([f"model.tie_word_embeddings={str(tied).lower()}"])
    assert parameter_count(cfg) == TitanModel(model_config(cfg)).num_parameters()
