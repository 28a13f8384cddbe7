#!/usr/bin/env bash
# Session 22, call 3 (on the device, repo root): the union kernel with 128-key steps (two blocks of the union a
# slot): its GPU tests, then every candidate on per-query-head masks at 32k (10 %, 5 %) and 128k (10 %), union.py.
. benchmarks/session.sh call3
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
timeout 200 python3 -m pytest -m gpu -q tests/test_gpu_kernels.py -k "union" > "$R/gpu_tests.log" 2>&1
step gpu_tests $?
timeout 120 python3 docs/experiments/kernel-speed/session22/union.py --json "$R/union32k.json" > "$R/union32k.log" 2>&1
step union32k $?
timeout 150 python3 docs/experiments/kernel-speed/session22/union.py --seqlens 131072 --densities 0.1 \
  --json "$R/union128k.json" > "$R/union128k.log" 2>&1
step union128k $?
finish
