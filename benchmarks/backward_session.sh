#!/usr/bin/env bash
# One GPU call for the block-sparse backward (H200): the backward's GPU tests (bf16), then the
# forward + backward benchmark; logs and JSON go to $OUT, a short table is printed last.
# Usage (repo root): bash benchmarks/backward_session.sh SEQLENS [TESTS]   e.g. 32768 1
set -uo pipefail
OUT=${OUT:-/tmp/seerattn_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
SEQLENS=${1:-32768}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if [ "${2:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu tests/test_gpu_kernels.py -p no:cacheprovider \
    -k "backward or flex_backward" --durations=10 2>&1 | tee "$OUT/gpu_tests_bwd.log" | tail -15
fi
timeout "${BENCH_TIMEOUT:-200}" python3 -m benchmarks.attention --backward --rep 50 --models llama3.1-8b \
  --seqlens "$SEQLENS" --densities "${DENSITIES:-1.0,0.1,0.05,0.5}" --masks structured,random \
  --block-sizes 64,128 --mask-heads hkv,hq --json "$OUT/bench_bwd_${SEQLENS//,/_}.json" 2> "$OUT/bench_bwd.log" \
  | tail -40
echo "[bench exit ${PIPESTATUS[0]}]"
