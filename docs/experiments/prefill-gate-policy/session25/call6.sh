#!/usr/bin/env bash
# Session 25, call 6 (on the device, the tree of call 5): the 128k TTFT at densities 0.1 and 0.05.
. benchmarks/session.sh call6
timeout -k 10 200 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/ttft128k.json" > "$R/ttft128k.log" 2>&1
step ttft128k $?; grep -E "^T=" "$R/ttft128k.log" | cut -c1-300
finish
