#!/usr/bin/env bash
# Session 18, call 6 (branch wip/gluon-fwd): the library's warp-specialised Hopper forward (sparse_fwd_ws, a tuning
# candidate of impl="triton" for per-group masks at block 64): its GPU tests and every forward candidate's, then the
# block-64 per-group sweep at 32k with Flex and FA4 in one process (the tuned "ours" row may pick it).
# Device calls: carry .gpu/fa4a (command `ls .gpu/fa4a`), then at once carry .gpu/fa4b and run this.
. benchmarks/session.sh s18c6
. benchmarks/fa4_payload.sh install
step fa4-install $?
timeout -k 10 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py \
  -k "hopper_ws or every_sparse_config" > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 15 "$R/gpu_tests.log"
timeout -k 10 200 python3 -m benchmarks.attention --rep 30 --seqlens 32768 --densities 1.0,0.1,0.05 --block-sizes 64 \
  --mask-heads hkv --sweep --json "$R/sweep64.json" > "$R/sweep64.log" 2>&1
step sweep64 $?; grep -E "tuned|^llama" "$R/sweep64.log" | cut -c1-250 | tail -n 30
finish
