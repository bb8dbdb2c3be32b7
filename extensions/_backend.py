"""Backend selection shared by every public function of `ltm_extensions`.

`backend="torch"` always runs the plain-PyTorch reference. `backend="triton"` forces the Triton kernel: on CUDA
tensors, or on CPU tensors under the Triton interpreter (`TRITON_INTERPRET=1`). `backend="auto"` uses Triton iff
the tensors are on CUDA and Triton can be imported, the reference otherwise.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve `backend` for these tensors: True to run the Triton kernel, False for the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_importable()
    # forced
    if not triton_importable():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install 'ltm[triton]')")
    if not on_cuda and not interpreting():
        raise RuntimeError("backend='triton' on non-CUDA tensors only works under the Triton interpreter "
                           "(set TRITON_INTERPRET=1 before triton is imported)")
    return True


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
