"""`python -m ltm_extensions.aot`: the attention kernels compile for sm_90 in bf16 on a machine without a GPU (the
CPU interpreter cannot run bf16 dots), and their resource usage is reported."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")


def test_attention_kernels_compile_for_sm90_in_bf16():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "ltm_extensions.aot", "--head-dim", "64", "--window", "on",
                             "--key-bias", "on"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["window"], r["key_bias"]) for r in rows} == {(k, True, True) for k in ("fwd", "kv", "q")}
    for row in rows:
        assert "error" not in row, row
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] > 0 and row["stack_bytes"] >= 0, row
