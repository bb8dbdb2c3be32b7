#!/usr/bin/env bash
# One call on a GPU machine: kernel tests in bf16 on the real GPU, then the kernel and model benchmarks, raw JSON
# under $OUT (default ./gpu_out). Run from the repository root:
#   bash scripts/gpu_check.sh
# On the project's lent GPU machines, first install the wheels it lacks (see ../shared/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the package maps extensions/ to ltm_extensions; without an install, expose it under that name
if ! python3 -c "import ltm_extensions" 2>/dev/null; then
    mkdir -p /tmp/ltm_pkgs && ln -sfn "$PWD/extensions" /tmp/ltm_pkgs/ltm_extensions && ln -sfn "$PWD/conf" /tmp/ltm_pkgs/ltm_conf
    export PYTHONPATH="/tmp/ltm_pkgs:${PYTHONPATH:-}:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
python3 -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log" | tail -n 5
python3 -m ltm_cli bench kernels --dtype bfloat16 --json "$OUT/kernels_bf16.json" 2>&1 | tail -n 40
python3 -m ltm_cli bench model --model base --dtype bfloat16 --context 2048 --context 4096 --context 8192 \
    --context 16384 --context 32768 --gen 1024 --gen 8192 --json "$OUT/model_base_bf16.json" 2>&1 | tail -n 40
