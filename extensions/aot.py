"""Ahead-of-time compilation of the attention kernels for a GPU target, on a machine without a GPU.

    python -m ltm_extensions.aot [--arch 90] [--dtype bfloat16] [--head-dim 64 --head-dim 128] [--configs all]
                                 [--window both|on|off] [--key-bias both|on|off]

compiles the forward, dK/dV and dQ kernels for each launch config (`--configs default`: the one used when
`LTM_TRITON_AUTOTUNE=0`; `all`: every autotune candidate), causal with and without a window (`--window`), with and
without the prefix keys' score bias (`--key-bias`), and prints each
config's registers per thread, stack (spilled registers live there) and shared memory. It catches compile errors,
bf16 included (the CPU interpreter cannot run bf16 dots), and configs that spill, before any device time is spent.
Register counts come from this machine's Triton and ptxas: a GPU machine with another Triton version can allocate
differently, so they rank configs; only timings on the GPU decide. Needs Triton's NVIDIA backend (it ships ptxas
and cuobjdump); the Triton interpreter must be off (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _triton_attention as attn
from ._backend import next_pow2

KERNELS = {"fwd": attn._attn_fwd, "kv": attn._attn_bwd_kv, "q": attn._attn_bwd_q}
_DATA = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # tensors in the input dtype
_FP32 = {"LSE", "DELTA", "BIAS", "DB"}  # fp32 tensors (the key bias in base 2, its gradient)
_FLOATS = {"qk_scale", "sm_scale"}
_TRITON_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def compile_attention(kind: str, config: tuple[int, int, int, int], *, dtype: str = "bfloat16", head_dim: int = 64,
                      causal: bool = True, window: bool = False, bias: bool = False, arch: int = 90):
    """Compile kernel `kind` (fwd | kv | q) for sm_<arch> with config (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    jit = KERNELS[kind].fn  # the autotuner's JITFunction
    if not hasattr(jit, "params"):
        raise RuntimeError("the Triton interpreter is on (TRITON_INTERPRET=1): unset it to compile for a GPU")
    bm, bn, warps, stages = config
    block_d = max(16, next_pow2(head_dim))  # as the launcher pads it
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_WINDOW=window, HAS_BIAS=bias,
                      DOT_PREC="ieee" if dtype == "float32" else "tf32", BLOCK_M=bm, BLOCK_N=bn)
    signature = {}
    for p in jit.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in _DATA:
            signature[p.name] = "*" + _TRITON_DTYPES[dtype]
        elif p.name in _FP32:
            signature[p.name] = "*fp32"
        else:
            signature[p.name] = "fp32" if p.name in _FLOATS else "i32"
    source = ASTSource(jit, signature, constexprs={(jit.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def resource_usage(compiled) -> dict[str, int]:
    """Registers per thread, stack bytes (where spilled registers go) and shared memory of a compiled kernel
    (cuobjdump -res-usage)."""
    cuobjdump = os.path.join(os.path.dirname(sys.modules["triton.backends.nvidia"].__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK):(\d+)", out)}
    return {"registers": usage["reg"], "stack_bytes": usage.get("stack", 0), "shared_bytes": compiled.metadata.shared}


def report(dtype: str, head_dims: list[int], which: str, arch: int, windows: tuple[bool, ...] = (False, True),
           biases: tuple[bool, ...] = (False, True)) -> list[dict[str, Any]]:
    rows = []
    for kind in KERNELS:
        spec = attn.CUDA_CONFIGS[kind]
        configs = [spec["default"]] if which == "default" else spec["tuned"] + [spec["default"]]
        for head_dim in head_dims:
            for window in windows:
                for bias in biases:
                    for config in configs:
                        row = dict(kernel=kind, dtype=dtype, head_dim=head_dim, window=window, key_bias=bias,
                                   config=list(config))
                        try:
                            row.update(resource_usage(compile_attention(kind, config, dtype=dtype, head_dim=head_dim,
                                                                        window=window, bias=bias, arch=arch)))
                        except Exception as e:  # report, go on with the others
                            row["error"] = f"{type(e).__name__}: {e}"[:300]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltm_extensions.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_TRITON_DTYPES))
    parser.add_argument("--head-dim", type=int, action="append", help="repeatable (default: 64 and 128)")
    parser.add_argument("--configs", default="default", choices=("default", "all"))
    parser.add_argument("--window", default="both", choices=("both", "on", "off"),
                        help="causal kernels with a sliding window (on: every code path), without, or both")
    parser.add_argument("--key-bias", default="both", choices=("both", "on", "off"),
                        help="kernels with the prefix keys' score bias (the tokens memory's read), without, or both")
    args = parser.parse_args(argv)
    both = {"both": (False, True), "on": (True,), "off": (False,)}
    rows = report(args.dtype, args.head_dim or [64, 128], args.configs, args.arch, both[args.window],
                  both[args.key_bias])
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
