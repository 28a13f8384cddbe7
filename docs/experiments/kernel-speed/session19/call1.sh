#!/usr/bin/env bash
# Session 19, call 1 (tree of 71e98ca: the kernels of f0c851c, its tests, this script): the Hopper forward with 128-key steps (two kept 64-token blocks
# a step, or one 128-token block; per-group masks): GPU tests of the warp-specialised forward and of every forward
# candidate, the per-group sweep at blocks 64 / 128 with FA4 and Flex in one process, the steps and ring depths in
# alternating rounds, then the time to first token (per-query-head masks: session 18's tile, never timed in the model).
# Device calls: carry .gpu/fa4a (command `ls .gpu/fa4a`), then at once carry .gpu/fa4b and run this.
. benchmarks/session.sh s19c1
. benchmarks/fa4_payload.sh install
step fa4-install $?
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py \
  -k "hopper_ws or every_sparse_config" > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 15 "$R/gpu_tests.log" | cut -c1-300
timeout -k 10 200 python3 -m benchmarks.attention --rep 30 --seqlens 32768 --densities 1.0,0.1,0.05 \
  --block-sizes 64,128 --mask-heads hkv --sweep --json "$R/sweep.json" > "$R/sweep.log" 2>&1
step sweep $?; grep -E "^llama" "$R/sweep.log" | grep -v "sdpa\|dense " | cut -c1-120
timeout -k 10 100 python3 docs/experiments/kernel-speed/session19/steps.py --json "$R/steps.json" > "$R/steps.log" 2>&1
step steps $?; cut -c1-150 "$R/steps.log" | tail -n 24
timeout -k 10 80 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/prefill32k.json" > "$R/prefill32k.log" 2>&1
step prefill-32k $?; grep -E "^T=" "$R/prefill32k.log"
timeout -k 10 140 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/prefill128k.json" > "$R/prefill128k.log" 2>&1
step prefill-128k $?; grep -E "^T=" "$R/prefill128k.log"
finish
