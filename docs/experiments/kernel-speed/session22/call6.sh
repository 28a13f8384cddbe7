#!/usr/bin/env bash
# Session 22, call 6 (on the device, repo root; the final kernel tree): the GPU tests the union commits touched and
# call 3 / 5 did not run on this tree: the refusals, every tuner candidate against the reference, the union's bit
# equality with the head pair.
. benchmarks/session.sh call6
timeout 110 python3 -m pytest -m gpu -q tests/test_gpu_kernels.py -k "refuses or every_sparse_config or union_equals" \
  > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -3 "$R/gpu_tests.log"
finish
