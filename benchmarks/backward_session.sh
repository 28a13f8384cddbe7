#!/usr/bin/env bash
# One GPU call for the block-sparse backward (H200): the backward's GPU tests (bf16), optionally a
# sweep of the backward's tile candidates, then the forward + backward benchmark (Llama-3.1-8B
# shapes); logs and JSON go to $OUT, a short table is printed last.
# Usage (repo root): bash benchmarks/backward_session.sh SEQLENS
#   TESTS_K   pytest -k expression for tests/test_gpu_kernels.py (default: every backward test; none = skip)
#   SWEEP=1   also time each dK/dV and dQ candidate at 32k, 10 %, per-group, block 64
#   MASK_HEADS, DENSITIES, BLOCK_SIZES: benchmark grid (defaults below)
set -uo pipefail
OUT=${OUT:-/tmp/seerattn_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
SEQLENS=${1:-32768}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
TESTS_K=${TESTS_K:-backward}
if [ "$TESTS_K" != none ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu tests/test_gpu_kernels.py -p no:cacheprovider \
    -k "$TESTS_K" --durations=10 2>&1 | tee "$OUT/gpu_tests_bwd.log" | tail -15
fi
if [ "${SWEEP:-0}" = 1 ]; then
  timeout "${SWEEP_TIMEOUT:-60}" python3 -m benchmarks.attention --backward --sweep --rep 50 --seqlens 32768 \
    --densities 0.1 --masks structured --block-sizes 64 --mask-heads hkv --providers ours \
    --json "$OUT/bench_bwd_sweep.json" 2> "$OUT/bench_bwd_sweep.log" | tail -12
fi
timeout "${BENCH_TIMEOUT:-200}" python3 -m benchmarks.attention --backward --rep 50 --models llama3.1-8b \
  --seqlens "$SEQLENS" --densities "${DENSITIES:-1.0,0.1,0.05,0.5}" --masks structured,random \
  --block-sizes "${BLOCK_SIZES:-64,128}" --mask-heads "${MASK_HEADS:-hkv,hq}" \
  --json "$OUT/bench_bwd_${SEQLENS//,/_}.json" 2> "$OUT/bench_bwd.log" | tail -40
echo "[bench exit ${PIPESTATUS[0]}]"
