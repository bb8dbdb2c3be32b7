"""Triton flash attention vs. the PyTorch reference vs. SDPA with the explicit `ltm_core` mask (values and grads)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ltm_core.attention import attention, attention_mask
from ltm_extensions import flash_attention
from ltm_extensions import reference as ref

CUDA = torch.cuda.is_available()
BF16_SKIP = "bf16 needs CUDA: the Triton interpreter's bf16 tl.dot is wrong (numpy has no bf16)"


def _inputs(B, H, lq, lk, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
               for n in (lq, lk, lk))
    do = torch.randn(B, H, lq, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def _run(fn, q, k, v, do):
    o = fn(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), do.to(o.dtype))
    return [o.float(), *(t.float() for t in grads)]


def _sdpa_truth(q, k, v, do, causal, prefix_len, window, scale=None):
    """fp32 (fp64 on CPU) ground truth: SDPA with the boolean mask from ltm_core."""
    mask = attention_mask(q.shape[-2], k.shape[-2], causal=causal, prefix_len=prefix_len, window=window,
                          device=q.device)
    hi = torch.float64 if q.device.type == "cpu" else torch.float32
    q2, k2, v2 = (t.detach().to(hi).requires_grad_() for t in (q, k, v))
    return _run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, scale=scale), q2, k2, v2,
                do.to(hi))


def _assert_close(got, want, tol, what):
    names = ("out", "dq", "dk", "dv")
    for name, a, b in zip(names, got, want):
        b = b.to(a.dtype)
        err = (a - b).abs().max().item()
        bound = tol * (1.0 + b.abs().max().item())
        assert err <= bound, f"{what}: {name} max err {err:.3g} > {bound:.3g}"


# (B, H, Lq, Lk, d, causal, prefix_len, window)
CASES = [
    (1, 2, 37, 37, 32, True, 0, None),  # plain causal, not a multiple of the block
    (2, 2, 70, 100, 64, True, 0, None),  # KV cache: Lq < Lk
    (2, 2, 1, 77, 64, True, 5, None),  # one decode step with a memory prefix
    (2, 2, 45, 61, 64, True, 16, None),  # memory-as-context prefix
    (1, 2, 50, 120, 64, True, 40, 17),  # prefix + sliding window, Lq < Lk
    (1, 2, 33, 33, 32, True, 0, 1),  # window of one: the diagonal only
    (1, 2, 50, 90, 64, False, 5, None),  # non-causal with prefix
    (1, 2, 90, 40, 32, False, 0, None),  # non-causal, Lq > Lk (memory read)
    (1, 1, 16, 23, 64, False, 0, None),  # memory write: slots attend to a segment
    (1, 2, 50, 90, 64, False, 5, 9),  # non-causal window
    (1, 2, 65, 68, 96, True, 3, None),  # head dim 96: padded to 128
    (1, 2, 100, 140, 128, True, 7, 30),  # head dim 128, prefix + window
    (1, 2, 150, 150, 128, True, 0, None),
    (1, 2, 130, 130, 64, True, 0, 40),  # several skipped blocks left of the window
    # blocks that every query of a block sees whole, besides partial ones
    (1, 2, 200, 270, 64, True, 70, 100),  # full and partial prefix blocks, mask-free blocks inside a window
    (1, 2, 160, 160, 32, False, 0, 96),  # non-causal window with mask-free blocks
    (1, 2, 128, 192, 64, True, 64, None),  # every length a multiple of the block
]


def _case_id(c):
    B, H, lq, lk, d, causal, p, w = c
    return f"B{B}H{H}-q{lq}-k{lk}-d{d}-{'causal' if causal else 'full'}-p{p}-w{w}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_flash_attention_fp32(case, device):
    B, H, lq, lk, d, causal, prefix_len, window = case
    q, k, v, do = _inputs(B, H, lq, lk, d, torch.float32, device)
    kw = dict(causal=causal, prefix_len=prefix_len, window=window)
    tri = _run(lambda a, b, c: flash_attention(a, b, c, backend="triton", **kw), q, k, v, do)
    refr = _run(lambda a, b, c: flash_attention(a, b, c, backend="torch", **kw), q, k, v, do)
    truth = _sdpa_truth(q, k, v, do, causal, prefix_len, window)
    tol = 1e-4 if (device == "cpu" or torch.get_float32_matmul_precision() == "highest") else 2e-2
    _assert_close(tri, truth, tol, "triton vs sdpa")
    _assert_close(refr, truth, 1e-4, "reference vs sdpa")
    _assert_close(tri, refr, tol, "triton vs reference")


def test_flash_attention_block_boundaries(device):
    """The kernels visit only the key (query) blocks that some query (key) of a block can see; an off-by-one in
    those ranges shows only where a range end meets a block boundary. Sweep the segment offset (Lk - prefix - Lq),
    the window and the prefix around multiples of the block size (32 under the interpreter). Each off-by-one of
    the range ends (forward/dQ lo and hi, dK/dV first and last query) fails this test."""
    cases = [(True, seg_off, window) for seg_off in (0, 30) for window in (None, 31, 64, 95)]
    cases += [(False, seg_off, window) for seg_off in (0, 30) for window in (31, 64)]
    lq = 100
    for i, (causal, seg_off, window) in enumerate(cases):
        prefix = (0, 32, 45)[i % 3]
        q, k, v, do = _inputs(1, 1, lq, prefix + lq + seg_off, 16, torch.float32, device, seed=i)
        kw = dict(causal=causal, prefix_len=prefix, window=window)
        tri = _run(lambda a, b, c: flash_attention(a, b, c, backend="triton", **kw), q, k, v, do)
        refr = _run(lambda a, b, c: flash_attention(a, b, c, backend="torch", **kw), q, k, v, do)
        tol = 1e-4 if (device == "cpu" or torch.get_float32_matmul_precision() == "highest") else 2e-2
        _assert_close(tri, refr, tol, f"prefix={prefix} seg_off={seg_off} causal={causal} window={window}")


FP16_CASES = [
    (1, 2, 64, 96, 64, True, 0, None),
    (2, 2, 45, 61, 32, True, 16, None),
    (1, 2, 50, 120, 128, True, 40, 17),
    (1, 2, 90, 40, 64, False, 0, None),
    (1, 2, 70, 75, 96, True, 5, 20),
    (1, 2, 300, 364, 64, True, 64, 160),  # mask-free blocks at the GPU's block sizes too
    (1, 2, 256, 256, 128, True, 0, None),
]


@pytest.mark.parametrize("case", FP16_CASES, ids=_case_id)
def test_flash_attention_fp16(case, device):
    B, H, lq, lk, d, causal, prefix_len, window = case
    q, k, v, do = _inputs(B, H, lq, lk, d, torch.float16, device, seed=1)
    kw = dict(causal=causal, prefix_len=prefix_len, window=window)
    tri = _run(lambda a, b, c: flash_attention(a, b, c, backend="triton", **kw), q, k, v, do)
    refr = _run(lambda a, b, c: flash_attention(a, b, c, backend="torch", **kw), q, k, v, do)
    truth = _sdpa_truth(q, k, v, do, causal, prefix_len, window)
    _assert_close(tri, truth, 1e-2, "triton fp16 vs sdpa")
    _assert_close(refr, truth, 1e-2, "reference fp16 vs sdpa")


@pytest.mark.skipif(not CUDA, reason=BF16_SKIP)
@pytest.mark.parametrize("case", FP16_CASES, ids=_case_id)
def test_flash_attention_bf16(case, device):
    B, H, lq, lk, d, causal, prefix_len, window = case
    q, k, v, do = _inputs(B, H, lq, lk, d, torch.bfloat16, device, seed=2)
    kw = dict(causal=causal, prefix_len=prefix_len, window=window)
    tri = _run(lambda a, b, c: flash_attention(a, b, c, backend="triton", **kw), q, k, v, do)
    truth = _sdpa_truth(q, k, v, do, causal, prefix_len, window)
    _assert_close(tri, truth, 5e-2, "triton bf16 vs sdpa")


def test_flash_attention_strided_inputs_and_scale(device):
    """Non-contiguous q/k/v (the model's [B, L, H, d] -> [B, H, L, d] transpose) and an explicit scale."""
    B, L, H, d, prefix_len = 2, 53, 2, 64, 7
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, L - prefix_len, H, d, generator=g).to(device).transpose(1, 2).requires_grad_()
    k = torch.randn(B, L, H, d, generator=g).to(device).transpose(1, 2).requires_grad_()
    v = torch.randn(B, L, H, d, generator=g).to(device).transpose(1, 2).requires_grad_()
    do = torch.randn(B, H, L - prefix_len, d, generator=g).to(device).transpose(2, 3).contiguous().transpose(2, 3)
    assert not q.is_contiguous() and not do.is_contiguous()
    scale = 0.3
    tri = _run(lambda a, b, c: flash_attention(a, b, c, prefix_len=prefix_len, scale=scale, backend="triton"),
               q, k, v, do)
    truth = _sdpa_truth(q, k, v, do, True, prefix_len, None, scale=scale)
    tol = 1e-4 if (device == "cpu" or torch.get_float32_matmul_precision() == "highest") else 2e-2
    _assert_close(tri, truth, tol, "strided")


def test_ltm_core_dispatch_uses_kernel(device):
    """`ltm_core.attention.attention(backend="triton")` routes to the kernel and matches its torch path."""
    q, k, v, do = _inputs(1, 2, 40, 56, 32, torch.float32, device, seed=4)
    kw = dict(causal=True, prefix_len=8, window=25)
    tri = _run(lambda a, b, c: attention(a, b, c, backend="triton", **kw), q, k, v, do)
    base = _run(lambda a, b, c: attention(a, b, c, backend="torch", **kw), q, k, v, do)
    _assert_close(tri, base, 1e-4, "ltm_core dispatch")


def test_reference_mask_matches_ltm_core():
    for lq, lk, causal, p, w in [(5, 9, True, 2, None), (7, 7, True, 0, 3), (9, 4, False, 1, 2), (1, 6, True, 3, 1)]:
        a = ref.attention_mask(lq, lk, causal=causal, prefix_len=p, window=w)
        b = attention_mask(lq, lk, causal=causal, prefix_len=p, window=w)
        assert torch.equal(a, b)


def test_flash_attention_argument_errors():
    q = torch.randn(1, 1, 10, 32)
    k = torch.randn(1, 1, 12, 32)
    with pytest.raises(ValueError, match="segment keys"):
        flash_attention(q, k, k, causal=True, prefix_len=4, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, k, k, backend="cuda")
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, k, window=0, backend="torch")


def test_default_scale_is_inverse_sqrt_d(device):
    q, k, v, _ = _inputs(1, 1, 20, 20, 32, torch.float32, device, seed=5)
    a = flash_attention(q, k, v, backend="triton")
    b = flash_attention(q, k, v, scale=1 / math.sqrt(32), backend="triton")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("window", [None, 3])
def test_cpu_prefix_read_with_explicit_scores_equals_the_fused_kernel(monkeypatch, window, backend):
    """On CPU a prefix read up to MATH_MAX_SCORES scores per head writes its scores out (`_ExplicitScores`), but not
    under torch.compile: the same output and gradients (q, k, v, key bias, straight-through weight) as SDPA's kernel
    with the key bias folded into a head dimension, which larger reads still take. The key bias's and the weight's
    gradients: in float32 one compiled pass (`cpu_kernels.prefix_grads`, spied), with `model.kernels=torch` PyTorch's
    ops."""
    import ltm_core.attention as A
    from ltm_core import cpu_kernels

    compiled = []
    monkeypatch.setattr(cpu_kernels, "prefix_grads", lambda *a, fn=cpu_kernels.prefix_grads: compiled.append(1) or fn(*a))

    B, H, lq, prefix, d = 2, 3, 6, 4, 8
    q, k, v, do = _inputs(B, H, lq, prefix + lq, d, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    bias, through = torch.randn(B, prefix, generator=g), torch.rand(B, prefix, generator=g)
    bias[0, 1] = -1e3  # an empty slot

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias, through)]
        o = attention(*leaves[:3], causal=True, prefix_len=prefix, window=window, key_bias=leaves[3],
                      key_through=leaves[4], backend=backend)
        return [o, *torch.autograd.grad(o, leaves, do)]

    calls, explicit = [], A._ExplicitScores

    class Counted:
        @staticmethod
        def apply(*args):
            calls.append(1)
            return explicit.apply(*args)

    monkeypatch.setattr(A, "_ExplicitScores", Counted)
    written_out = run()
    assert calls == [1]  # this small read took the explicit scores
    assert compiled == ([1] if backend == "auto" else [])
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        run()
    assert calls == [1]  # not under torch.compile
    monkeypatch.setattr(A, "MATH_MAX_SCORES", 0)  # larger than the threshold: SDPA's fused kernel
    fused = run()
    assert calls == [1]
    for got, want in zip(written_out, fused, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fused[4].abs().sum() > 0 and fused[5].abs().sum() > 0  # the bias and the weight learn


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_cpu_prefix_read_with_explicit_scores_in_half_precision(dtype, tol):
    """The explicit-scores read of half-precision inputs (scores and softmax in fp32, the products in the inputs'
    precision) follows the fp32 read: output and gradients (q, k, v, key bias, straight-through weight)."""
    B, H, lq, prefix, d = 2, 3, 6, 4, 8
    q, k, v, do = _inputs(B, H, lq, prefix + lq, d, torch.float32, "cpu")
    g = torch.Generator().manual_seed(2)
    bias, through = torch.randn(B, prefix, generator=g), torch.rand(B, prefix, generator=g)

    def run(dt):
        leaves = [t.to(dt).detach().clone().requires_grad_() for t in (q, k, v, bias, through)]
        o = attention(*leaves[:3], causal=True, prefix_len=prefix, key_bias=leaves[3], key_through=leaves[4])
        return [o, *torch.autograd.grad(o, leaves, do.to(dt))]

    for got, want in zip(run(dtype), run(torch.float32), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


# (B, H, Lq, Lk, d, causal, prefix_len, window): memory reads with a key bias on the prefix keys
BIAS_CASES = [
    (2, 2, 45, 45 + 37, 32, True, 37, None),  # a prefix block straddling the block size
    (1, 2, 64, 64 + 64, 64, True, 64, None),  # every length a multiple of the block
    (2, 1, 20, 30 + 50, 16, True, 50, 9),  # KV cache (Lq < segment) and a window
    (1, 2, 33, 33 + 5, 16, False, 5, None),  # non-causal
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", BIAS_CASES, ids=_case_id)
def test_flash_attention_key_bias(case, dtype, device):
    """The kernel's own key bias (added to the prefix keys' scores, its gradient summed over heads and queries):
    the Triton kernel and the reference against float64 SDPA with the bias folded into one more head dim, values
    and the gradients of q, k, v and the bias; an empty slot's -1e3 included."""
    B, H, lq, lk, d, causal, prefix_len, window = case
    q, k, v, do = _inputs(B, H, lq, lk, d, dtype, device, seed=8)
    g = torch.Generator().manual_seed(9)
    bias = torch.randn(B, prefix_len, generator=g).to(device)
    bias[0, 1] = -1e3

    def run(fn, q, k, v, bias, do):
        bias = bias.detach().clone().requires_grad_()
        o = fn(q, k, v, bias)
        grads = torch.autograd.grad(o, (q, k, v, bias), do.to(o.dtype))
        return [o.double(), *(t.double() for t in grads)]

    kw = dict(causal=causal, prefix_len=prefix_len, window=window)
    tri = run(lambda a, b, c, e: flash_attention(a, b, c, backend="triton", key_bias=e, **kw), q, k, v, bias, do)
    refr = run(lambda a, b, c, e: flash_attention(a, b, c, backend="torch", key_bias=e, **kw), q, k, v, bias, do)
    mask = attention_mask(lq, lk, causal=causal, prefix_len=prefix_len, window=window, device=device)
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]

    def folded(a, b, c, e):  # SDPA has no score bias with a gradient: one more head dim carries it
        extra = F.pad(e * d ** 0.5, (0, lk - prefix_len))[:, None, :, None].expand(B, H, lk, 1)
        y = F.scaled_dot_product_attention(F.pad(a, (0, 1), value=1.0), torch.cat([b, extra], -1), F.pad(c, (0, 1)),
                                           attn_mask=mask, scale=d ** -0.5)
        return y[..., :d]

    truth = run(folded, *hi, bias.double(), do.double())
    tol = (1e-4 if (device == "cpu" or torch.get_float32_matmul_precision() == "highest") else 2e-2) \
        if dtype == torch.float32 else 1e-2
    for name, a, b, c in zip(("out", "dq", "dk", "dv", "dbias"), tri, refr, truth):
        bound = tol * (1.0 + c.abs().max().item())
        assert (a - c).abs().max().item() <= bound, f"triton {name}"
        assert (b - c).abs().max().item() <= bound, f"reference {name}"
    assert truth[4].abs().sum() > 0


def test_flash_attention_key_bias_shape_error():
    q = torch.randn(2, 1, 8, 16)
    k = torch.randn(2, 1, 12, 16)
    with pytest.raises(ValueError, match=r"key_bias must be \[B, prefix_len\] = \[2, 4\]"):
        flash_attention(q, k, k, prefix_len=4, key_bias=torch.randn(2, 3), backend="torch")
