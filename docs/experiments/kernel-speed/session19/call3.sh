#!/usr/bin/env bash
# Session 19, call 3 (tree of the fma commit b8536b4 and its docs; .gpu/prev = the tree before it, c4ad020's src): the
# softmax's scale and shift in one fma. GPU tests of the warp-specialised forward; the steps benchmark alternating the
# two trees (separate processes, A / B / A / B); the time to first token (the per-query-head tile changes too). No
# FA4 (device time left after three failed machine starts: one call, no second carry). Carry .gpu/prev.
. benchmarks/session.sh s19c3
timeout -k 10 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py -k "hopper_ws" \
  > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log" | cut -c1-300
for round in 1 2; do
  for tree in prev new; do
    P=src:.; [ $tree = prev ] && P=.gpu/prev/src:.
    PYTHONPATH=$P timeout -k 10 60 python3 docs/experiments/kernel-speed/session19/steps.py --rounds 1 \
      --json "$R/steps_${tree}_$round.json" > "$R/steps_${tree}_$round.log" 2>&1
    step steps-$tree-$round $?; cut -c1-110 "$R/steps_${tree}_$round.log"
  done
done
timeout -k 10 150 python3 -m benchmarks.prefill --seqlens 32768,131072 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=" "$R/prefill.log"
finish
