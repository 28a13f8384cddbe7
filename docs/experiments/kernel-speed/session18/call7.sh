#!/usr/bin/env bash
# Session 18, call 7 (branch wip/gluon-heads): the Hopper forward's per-query-head kernel (two heads a program, a list
# and ring each): the GPU tests of the warp-specialised forward, then the block-64
# per-query-head sweep at 32k at 10 % (structured and random masks) with Flex and FA4 in one process (cut to fit the
# device time left: the first draft also ran every forward candidate's test and 100 %).
# Device calls: carry .gpu/fa4a (command `ls .gpu/fa4a`), then at once carry .gpu/fa4b and run this.
. benchmarks/session.sh s18c7
. benchmarks/fa4_payload.sh install
step fa4-install $?
timeout -k 10 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py \
  -k "hopper_ws" > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 15 "$R/gpu_tests.log"
timeout -k 10 200 python3 -m benchmarks.attention --rep 30 --seqlens 32768 --densities 0.1 --block-sizes 64 \
  --masks structured,random --mask-heads hq --sweep --json "$R/sweep64hq.json" > "$R/sweep64hq.log" 2>&1
step sweep64hq $?; grep -E "tuned|^llama" "$R/sweep64hq.log" | cut -c1-250 | tail -n 30
finish
