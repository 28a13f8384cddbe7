#!/usr/bin/env bash
# Session 20, call 3 (the final tree: call 2's global tile order reverted, the kernel of call 1's "new"): the time to
# first token at 128k, density 0.05 (the device time left fits one length and density).
. benchmarks/session.sh s20c3
timeout -k 10 120 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.05 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=" "$R/prefill.log"
finish
