#!/usr/bin/env bash
# Session 25, call 5 (on the device, repo root = 8a46784 + the scores kernel's two key tiles an iteration at one stage
# + the split weights kept on the gate): the whole gate and the scores kernel (gate_parts), the 32k TTFT.
. benchmarks/session.sh call5
timeout -k 10 70 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts scores,gate --json "$R/new.json" \
  > "$R/new.log" 2>&1
step new $?; grep -E "scores  |gate" "$R/new.log" | cut -c1-120
timeout -k 10 110 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/ttft32k.json" > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300
finish
