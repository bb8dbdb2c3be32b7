"""Fused RMSNorm(+residual), SwiGLU, memory update and compression gate: Triton vs. reference vs. plain autograd."""

import pytest
import torch
import torch.nn.functional as F

from ltm_extensions import compress_gate, memory_update, rms_norm, swiglu

CUDA = torch.cuda.is_available()
BF16_SKIP = "bf16 needs CUDA: the Triton interpreter's bf16 (tl.dot, rounding on casts) is not faithful"

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(not CUDA, reason=BF16_SKIP)),
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _rand(shape, dtype, device, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(device=device, dtype=dtype).requires_grad_()


def _value_and_grads(fn, inputs, seed=100):
    out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(seed)
    gouts = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, gouts)
    return [o.float() for o in outs] + [t.float() for t in grads]


def _assert_close(got, want, tol, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"{what}[{i}]: shape {a.shape} != {b.shape}"
        err = (a - b).abs().max().item()
        bound = tol * (1.0 + b.abs().max().item())
        assert err <= bound, f"{what}[{i}]: max err {err:.3g} > {bound:.3g}"


def _check(fn_backend, truth, inputs, dtype, what):
    tri = _value_and_grads(lambda *a: fn_backend(*a, backend="triton"), inputs)
    ref = _value_and_grads(lambda *a: fn_backend(*a, backend="torch"), inputs)
    gt_inputs = [t.detach().double().requires_grad_() for t in inputs]
    gt = _value_and_grads(truth, gt_inputs)
    tol = TOL[dtype]
    _assert_close(tri, ref, tol, f"{what} triton vs reference")
    _assert_close(tri, gt, tol, f"{what} triton vs autograd")
    _assert_close(ref, gt, tol, f"{what} reference vs autograd")


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 100), (3, 64), (5, 1000)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(dtype, shape, with_residual, device):
    n = shape[-1]
    eps = 1e-5
    x = _rand(shape, dtype, device, 0)
    w = _rand((n,), dtype, device, 1, scale=0.1, offset=1.0)
    if with_residual:
        r = _rand(shape, dtype, device, 2)

        def fn(x, w, r, backend):
            return rms_norm(x, w, eps, residual=r, backend=backend)

        def truth(x, w, r):
            # the kernel normalises the sum rounded to the input dtype, like `x + residual` in that dtype
            h = (x + r).detach().to(dtype).to(x.dtype)
            h = h + ((x + r) - (x + r).detach())  # straight-through for the gradient
            return F.rms_norm(h, (n,), w, eps), x + r

        _check(fn, truth, [x, w, r], dtype, "rms_norm+residual")
    else:
        _check(lambda x, w, backend: rms_norm(x, w, eps, backend=backend),
               lambda x, w: F.rms_norm(x, (n,), w, eps), [x, w], dtype, "rms_norm")


def test_rms_norm_fp32_weight_half_input(device):
    """Mixed dtypes as under autocast: fp16 activations, fp32 weight; output and dx in fp16, dw in fp32."""
    x = _rand((4, 24, 48), torch.float16, device, 3)
    w = _rand((48,), torch.float32, device, 4, scale=0.1, offset=1.0)
    tri = rms_norm(x, w, 1e-6, backend="triton")
    ref = rms_norm(x, w, 1e-6, backend="torch")
    assert tri.dtype == ref.dtype == torch.float16
    gx, gw = torch.autograd.grad(tri, (x, w), torch.ones_like(tri))
    assert gx.dtype == torch.float16 and gw.dtype == torch.float32
    rx, rw = torch.autograd.grad(ref, (x, w), torch.ones_like(ref))
    _assert_close([tri.float(), gx.float(), gw], [ref.float(), rx.float(), rw], 2e-3, "mixed")


def test_rms_norm_default_eps_matches_functional(device):
    x = _rand((6, 40), torch.float32, device, 5)
    w = _rand((40,), torch.float32, device, 6)
    torch.testing.assert_close(rms_norm(x, w, backend="triton"), F.rms_norm(x, (40,), w))


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 33, 70), (4097,)], ids=str)
def test_swiglu(dtype, shape, device):
    g = _rand(shape, dtype, device, 10, scale=2.0)
    u = _rand(shape, dtype, device, 11)
    _check(lambda a, b, backend: swiglu(a, b, backend=backend), lambda a, b: F.silu(a) * b, [g, u], dtype, "swiglu")


def test_swiglu_broadcast(device):
    g = _rand((3, 7, 16), torch.float32, device, 12)
    u = _rand((16,), torch.float32, device, 13)
    _check(lambda a, b, backend: swiglu(a, b, backend=backend), lambda a, b: F.silu(a) * b, [g, u], torch.float32,
           "swiglu broadcast")


# ----------------------------------------------------------------------------------------------------------------


def _mem_update_truth(mem, new, logits):
    u = torch.sigmoid(logits)
    return (1 - u) * mem + u * new


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9, 40), (3, 16, 257)], ids=str)
def test_memory_update(dtype, shape, device):
    mem = _rand(shape, dtype, device, 20)
    new = _rand(shape, dtype, device, 21)
    logits = _rand(shape, dtype, device, 22, scale=2.0)
    _check(lambda a, b, c, backend: memory_update(a, b, c, backend=backend), _mem_update_truth, [mem, new, logits],
           dtype, "memory_update")


def test_memory_update_expanded_initial_memory(device):
    """The first write reads `initial.expand(B, M, D)` (stride 0 on B): the gradient is summed over the batch."""
    M, D, B = 6, 24, 3
    initial = _rand((M, D), torch.float32, device, 23)
    new = _rand((B, M, D), torch.float32, device, 24)
    logits = _rand((B, M, D), torch.float32, device, 25)

    def fn(init, n, lg, backend):
        return memory_update(init.unsqueeze(0).expand(B, M, D), n, lg, backend=backend)

    def truth(init, n, lg):
        return _mem_update_truth(init.unsqueeze(0).expand(B, M, D), n, lg)

    _check(fn, truth, [initial, new, logits], torch.float32, "memory_update expanded")


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 45, 40), (1, 30, 1000), (7, 64)], ids=str)
def test_compress_gate(dtype, shape, device):
    c = _rand(shape, dtype, device, 30)
    s = _rand(shape[:-1] + (1,), dtype, device, 31, scale=2.0)
    _check(lambda a, b, backend: compress_gate(a, b, backend=backend), lambda a, b: a * torch.sigmoid(b), [c, s],
           dtype, "compress_gate")


def test_compress_gate_matches_memory_module(device):
    """Same value as the slots memory's entries: c * sigmoid(w . c)."""
    from ltm_core.config import SlotsMemoryConfig, TitanConfig
    from ltm_core.memory.slots import SlotsMemory

    cfg = TitanConfig(memory=SlotsMemoryConfig(), kernels="torch")
    mod = SlotsMemory(cfg).to(device)
    mod.reset_parameters()
    h = torch.randn(2, 11, cfg.hidden_size, device=device)
    c = mod.compress(mod.norm(h))
    want = mod.entries(h)
    got = compress_gate(c, mod.importance(c), backend="triton")
    torch.testing.assert_close(got, want)


def test_compress_gate_rejects_wide_logits():
    with pytest.raises(ValueError, match="size 1"):
        compress_gate(torch.randn(2, 3, 4), torch.randn(2, 3, 4), backend="torch")
