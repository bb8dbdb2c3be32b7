"""Kernel tests: Triton kernels vs. the PyTorch references vs. independent ground truth.

Without CUDA the Triton kernels run under the CPU interpreter: TRITON_INTERPRET must be set before any
`@triton.jit` function is created, so it is set here, at the top, before triton or the kernel modules are imported.
With CUDA the real kernels run on the GPU (unless TRITON_INTERPRET was set by the caller), with one launch
config each (LTM_TRITON_AUTOTUNE=0).
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # one launch config per kernel instead of autotuning every new shape key (keeps GPU test time in check;
    # `ltm_extensions.bench` exercises the autotuned configs)
    os.environ.setdefault("LTM_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load_ltm_extensions() -> None:
    """Shim until the package is installed: import the working tree's `extensions/` as `ltm_extensions`."""
    here = ROOT / "extensions"
    mod = sys.modules.get("ltm_extensions")
    if mod is None:
        try:
            import ltm_extensions as mod  # installed (editable or not)
        except ImportError:
            mod = None
    if mod is not None and Path(mod.__file__).resolve().parent == here.resolve():
        return
    for name in [n for n in sys.modules if n == "ltm_extensions" or n.startswith("ltm_extensions.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("ltm_extensions", here / "__init__.py",
                                                  submodule_search_locations=[str(here)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ltm_extensions"] = module
    spec.loader.exec_module(module)


_load_ltm_extensions()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
