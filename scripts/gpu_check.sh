#!/usr/bin/env bash
# One call on a GPU machine: the kernel tests on the real GPU (fp32, fp16 and bf16), then the kernel and model
# benchmarks in bf16. Raw JSON and logs go under $OUT (default ./gpu_out); each stage has its own time limit, so
# a stage that hangs costs only its own share. Run from the repository root:
#   LTM_COMMIT=<commit> bash scripts/gpu_check.sh
# On the project's lent GPU machines, first install the wheels it lacks (see ../shared/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# STAGES picks the stages (default: all, in this order); their limits (seconds) are T_<STAGE>. Times seen on an H200
# on 2026-11-30 (commit 45bdb8b): tests 120 s (one fp32 test unfinished: the fp32 attention tests compile for
# 13-50 s each), kernels 142 s, model 2K-16K 150 s (the memory variants run at ~6K tokens/s: 32K rows take ~30 s each).
# With 15 minutes of device time a session, about 9 minutes of stages fit in one call: choose, e.g.
#   STAGES=overhead LTM_COMMIT=<commit> bash scripts/gpu_check.sh      (about 8 minutes at most)
set -uo pipefail
STAGES=${STAGES:-tests kernels model batch overhead}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-160}
# the package maps extensions/ to ltm_extensions and conf/ to ltm_conf; without an install, expose those names
if ! python3 -c "import ltm_extensions" 2>/dev/null; then
    mkdir -p /tmp/ltm_pkgs && ln -sfn "$PWD/extensions" /tmp/ltm_pkgs/ltm_extensions && ln -sfn "$PWD/conf" /tmp/ltm_pkgs/ltm_conf
    export PYTHONPATH="/tmp/ltm_pkgs:${PYTHONPATH:-}:$PWD"
fi
log="$OUT/log.txt"
stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log its output, print its status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)" | tee -a "$log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 30
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
}
{  # the device, at the top of the log ($OUT holds at most 8 files that come back)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit ${LTM_COMMIT:-unknown}; stages: $STAGES; date $(date -u +%FT%TZ)"
} 2>&1 | tee "$log"
want() { [[ " $STAGES " == *" $1 "* ]]; }
# kernel tests: values and gradients against the references, every dtype, one launch config per kernel
want tests && stage tests "${T_TESTS:-180}" python3 -m pytest tests/kernels -q -p no:cacheprovider -n 16 -rs \
    --junitxml="$OUT/kernel_tests.xml"
# kernels against their references, SDPA and FlexAttention (autotuned configs)
want kernels && stage kernels "${T_KERNELS:-200}" python3 -m ltm_cli bench kernels --dtype bfloat16 \
    --json "$OUT/gpu_kernels_bf16.json"
# model=base: memory model against the segment-local and full-causal baselines, batch 1, + generation
want model && stage model "${T_MODEL:-200}" python3 -m ltm_cli bench model --model base --dtype bfloat16 \
    --context 4096 --context 16384 --context 32768 --gen 1024 --gen 4096 --json "$OUT/gpu_model_base_bf16.json"
# the same at batch 4 (utilisation: MFU), memory model and full causal, 4K and 32K
want batch && stage batch "${T_BATCH:-120}" python3 -m ltm_cli bench model --model base --dtype bfloat16 \
    --batch-size 4 --variant memory --variant full_causal --context 4096 --context 32768 \
    --json "$OUT/gpu_model_base_bf16_b4.json"
# where the memory model's time goes (it is launch-bound on GPU): the plain-PyTorch ops instead of the Triton
# kernels, and the whole-segment step compiled (blocks + memory writes, one graph per segment; default mode:
# Inductor's fused kernels; reduce-overhead: the segment replayed as a CUDA graph)
if want overhead; then
    for variant in "kernels_torch 60 model.kernels=torch" "compiled 180 model.compile=true" \
                   "graphs 180 model.compile=true model.compile_mode=reduce-overhead"; do
        set -- $variant
        name=$1 limit=$2; shift 2
        stage "overhead_$name" "${T_OVERHEAD:-$limit}" python3 -m ltm_cli bench model --model base --dtype bfloat16 \
            --variant memory --variant full_causal --context 4096 --context 32768 "$@" \
            --json "$OUT/gpu_model_base_bf16_$name.json"
    done
    # the MFU target (4K) with the segment as one CUDA graph, batch 4
    stage overhead_graphs_b4 "${T_OVERHEAD:-100}" python3 -m ltm_cli bench model --model base --dtype bfloat16 \
        --batch-size 4 --variant memory --variant full_causal --context 4096 model.compile=true \
        model.compile_mode=reduce-overhead --json "$OUT/gpu_model_base_bf16_graphs_b4.json"
fi
ls -la "$OUT"
