"""Backend selection, and `import ltm_extensions` without triton."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ltm_extensions
from ltm_extensions._backend import use_triton

ROOT = Path(__file__).resolve().parents[2]


def test_backend_resolution_on_cpu():
    x = torch.zeros(2)
    assert use_triton("torch", x) is False
    assert use_triton("auto", x) is False  # auto = Triton only on CUDA
    with pytest.raises(ValueError, match="backend"):
        use_triton("flash", x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", x) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton("triton", x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_uses_triton_on_cuda():
    x = torch.zeros(2, device="cuda")
    assert use_triton("auto", x) is True


def test_import_and_torch_backend_without_triton():
    code = f"""
import importlib.util, sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
sys.path.insert(0, {str(ROOT)!r})
spec = importlib.util.spec_from_file_location("ltm_extensions", {str(ROOT / "extensions" / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT / "extensions")!r}])
m = importlib.util.module_from_spec(spec); sys.modules["ltm_extensions"] = m; spec.loader.exec_module(m)
import torch
import ltm_extensions.bench
assert not m.triton_importable()
q = torch.randn(1, 2, 8, 16)
o = m.flash_attention(q, q, q)  # auto -> reference
assert o.shape == q.shape
m.rms_norm(q, torch.ones(16), 1e-5); m.swiglu(q, q); m.memory_update(q, q, q); m.compress_gate(q, q[..., :1])
try:
    m.flash_attention(q, q, q, backend="triton")
except RuntimeError as e:
    assert "triton" in str(e)
else:
    raise SystemExit("forced triton without triton should fail")
assert "triton" not in [n for n in sys.modules if sys.modules[n] is not None]
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_public_api():
    for name in ("flash_attention", "rms_norm", "swiglu", "memory_update", "compress_gate"):
        assert callable(getattr(ltm_extensions, name))


def test_model_ops_leave_auto_to_inductor_under_torch_compile(monkeypatch):
    """model.kernels=auto: the Triton kernels on CUDA in eager mode; while torch.compile traces the model, the
    PyTorch ops, which Inductor fuses (the Triton autograd functions are not traceable)."""
    import ltm_extensions as ext
    from ltm_core.ops import use_kernels

    class CudaLike:
        is_cuda = True

    monkeypatch.setattr(ext, "triton_importable", lambda: True)
    assert use_kernels("auto", CudaLike()) is True
    assert use_kernels("auto", torch.zeros(2)) is False and use_kernels("triton", torch.zeros(2)) is True
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert use_kernels("auto", CudaLike()) is False
    assert use_kernels("torch", CudaLike()) is False


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_attention_auto_takes_the_kernel_measured_fastest_per_mask(monkeypatch, backend):
    """`auto` where the kernels apply (CUDA): SDPA's fused kernel for a plain mask (measured 0.61-0.64x the Triton
    kernel's time), the Triton kernel for a memory prefix, a sliding window and a KV cache (AUTO_CHOICE); a forced
    `triton` takes the kernel for every mask."""
    import ltm_core.attention as A
    import ltm_extensions as ext

    calls = []
    monkeypatch.setattr(A, "use_kernels", lambda b, x: True)  # as on CUDA with Triton importable
    monkeypatch.setattr(ext, "flash_attention", lambda q, k, v, **kw: calls.append(kw) or torch.zeros_like(q))
    q = torch.randn(1, 2, 8, 16)
    kv = torch.randn(1, 2, 12, 16)
    cases = {"plain": dict(k=q, causal=True), "full": dict(k=kv, causal=False),
             "prefix": dict(k=kv, causal=True, prefix_len=4), "window": dict(k=q, causal=True, window=3),
             "cached": dict(k=kv, causal=True)}
    took = {}
    for name, case in cases.items():
        k = case.pop("k")
        before = len(calls)
        A.attention(q, k, k, backend=backend, **case)
        took[name] = "triton" if len(calls) > before else "sdpa"
    if backend == "triton":
        assert set(took.values()) == {"triton"}
    else:
        assert took == {"plain": "sdpa", "full": "sdpa", "prefix": "triton", "window": "triton", "cached": "triton"}


def test_the_kernel_takes_the_key_bias_at_the_head_dim_as_it_is(monkeypatch):
    """Where the Triton kernel reads a memory prefix, the tokens memory's key bias goes to the kernel as it is (head
    dim d, not folded into a (d + 1)th that its launcher would pad to the next power of two); a bias over other than
    the prefix keys, or a mask the kernel does not take under `auto`, is still folded (SDPA)."""
    import ltm_core.attention as A
    import ltm_extensions as ext

    calls = []
    monkeypatch.setattr(A, "use_kernels", lambda b, x: True)  # as on CUDA with Triton importable
    monkeypatch.setattr(ext, "flash_attention", lambda q, k, v, **kw: calls.append((q.shape[-1], kw))
                        or torch.zeros_like(q))
    q, kv = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 12, 16)
    A.attention(q, kv, kv, causal=True, prefix_len=4, key_bias=torch.randn(1, 4))
    (d, kw), = calls
    assert d == 16 and kw["key_bias"].shape == (1, 4) and kw["prefix_len"] == 4
    A.attention(q, kv, kv, causal=True, prefix_len=4, key_bias=torch.randn(1, 3), backend="triton")
    assert calls[1][0] == 17 and calls[1][1]["key_bias"] is None  # folded: a bias on 3 of the 4 prefix keys
