#!/usr/bin/env bash
# Session 18, call 2 (tree of b50bfa2, which added the 64-row per-group candidates, removed after): those
# candidates (64 rows on 4 warps, two programs an SM) beside the 128-row 8-warp ones, FlexAttention and
# FlashAttention-4 in one process: the GPU test of every forward candidate in bf16, then the block-64 per-group sweep at 32k.
# Device calls: carry .gpu/fa4a (command `ls .gpu/fa4a`), then at once carry .gpu/fa4b and run this.
. benchmarks/session.sh s18c2
. benchmarks/fa4_payload.sh install
step fa4-install $?
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py \
  -k "every_sparse_config" > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
timeout 300 python3 -m benchmarks.attention --rep 30 --seqlens 32768 --densities 1.0,0.1,0.05 --block-sizes 64 \
  --mask-heads hkv --sweep --json "$R/sweep64.json" > "$R/sweep64.log" 2>&1
step sweep64 $?; grep -vE "^(WARNING|  warnings)" "$R/sweep64.log" | tail -n 40
finish
