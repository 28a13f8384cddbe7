#!/usr/bin/env bash
# One GPU session on the H200: environment, GPU tests, benchmarks. Logs and JSON go to $OUT; short
# tables are printed last. Usage (repo root): bash benchmarks/gpu_session.sh [tune|final]
#   tune : config sweep at Llama-3.1-8B 32k (every candidate config timed)
#   check: the untuned default configs at 32k for three models, no FlexAttention
#   final: the results table (docs/results.md): 32k densities/masks/mask heads/block sizes, the
#          T sweep 8k-128k, Qwen2.5-7B and a D = 64 model.
set -uo pipefail
OUT=${OUT:-/tmp/seerattn_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
MODE=${1:-final}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # Tests use the first (untuned) config of each kernel: fewer compiles.
  SEERATTN_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu tests/test_gpu_kernels.py \
    -p no:cacheprovider ${TEST_ARGS:-} 2>&1 | grep -v "^DEBUG" | tee "$OUT/gpu_tests.log" | tail -8
fi

bench() {  # bench NAME TIMEOUT ARGS...  (stdout: the table; JSON per group; logs appended)
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m benchmarks.attention --rep 50 "$@" --json "$OUT/bench_$name.json" 2>> "$OUT/bench.log"
  echo "[bench $name exit $?]" | tee -a "$OUT/bench.log" >&2
}

if [ "$MODE" = check ]; then
  # Untuned defaults only (first candidate of each kernel), no FlexAttention: quick re-measurement.
  SEERATTN_TRITON_AUTOTUNE=0 bench check 90 --models qwen2.5-7b,llama3.2-1b,llama3.1-8b --seqlens 32768 \
    --densities 1.0,0.1 --masks structured,random --mask-heads hq,hkv --providers ours,fa2,cudnn
elif [ "$MODE" = tune ]; then
  bench tune 300 --models llama3.1-8b --seqlens 32768 --densities 1.0,0.1 --masks structured,random \
    --block-sizes 64,128 --mask-heads hkv,hq --scores --sweep --union-off
else
  # The headline group first (a timeout later costs the least); its table is printed last.
  bench a 110 --models llama3.1-8b --seqlens 32768 --densities 1.0,0.5,0.3,0.1,0.05 --masks structured,random \
    --block-sizes 64 --mask-heads hkv,hq --scores --union-off > "$OUT/table_a.txt"
  bench a128 50 --models llama3.1-8b --seqlens 32768 --densities 1.0,0.1 --block-sizes 128 --mask-heads hkv,hq \
    > /dev/null
  bench b 90 --models llama3.1-8b --seqlens 8192,65536,131072 --densities 1.0,0.1 --mask-heads hkv > /dev/null
  bench c 80 --models qwen2.5-7b,llama3.2-1b --seqlens 32768 --densities 1.0,0.1 --mask-heads hkv,hq > /dev/null
  python3 -m benchmarks.summary "$OUT"/bench_a128.json "$OUT"/bench_b.json "$OUT"/bench_c.json
  tail -n 45 "$OUT/table_a.txt"
fi
