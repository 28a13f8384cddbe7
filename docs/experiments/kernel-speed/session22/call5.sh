#!/usr/bin/env bash
# Session 22, call 5 (on the device, repo root): the head-pair kernel with 128-key steps (one ring both warpgroups
# fill in turn): the Hopper forward's GPU tests (all of them: the shared _attend changed), then every candidate on
# per-query-head masks at 32k and 128k (union.py).
. benchmarks/session.sh call5
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$R/gpu.txt"
timeout 240 python3 -m pytest -m gpu -q tests/test_gpu_kernels.py -k "hopper_ws or every_sparse_config" \
  > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -3 "$R/gpu_tests.log"; save
timeout 110 python3 docs/experiments/kernel-speed/session22/union.py --json "$R/union32k.json" > "$R/union32k.log" 2>&1
step union32k $?; save
timeout 120 python3 docs/experiments/kernel-speed/session22/union.py --seqlens 131072 --densities 0.1 \
  --json "$R/union128k.json" > "$R/union128k.log" 2>&1
step union128k $?
finish
