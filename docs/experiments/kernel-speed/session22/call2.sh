#!/usr/bin/env bash
# Session 22, call 2 (on the device, repo root): the union kernel's GPU tests (bit for bit against the head-pair
# kernel first, alone: a hang there would be a ring deadlock), the Hopper forward's GPU tests, then the kernel
# candidates on per-query-head masks at 32k (union.py).
. benchmarks/session.sh call2
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
timeout 150 python3 -m pytest -m gpu -q -x tests/test_gpu_kernels.py -k "union_equals" > "$R/union_test.log" 2>&1
step union_test $?
timeout 300 python3 -m pytest -m gpu -q tests/test_gpu_kernels.py -k "hopper_ws" > "$R/gpu_tests.log" 2>&1
step gpu_tests $?
timeout 100 python3 docs/experiments/kernel-speed/session22/union.py --json "$R/union32k.json" > "$R/union32k.log" 2>&1
step union32k $?
finish
