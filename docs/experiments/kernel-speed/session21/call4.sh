#!/usr/bin/env bash
# Session 21, call 4 (the final tree, 7465382's kernel): the time to first token at 128k (per-query-head masks,
# block 64, 0.1), and how much adjacent query blocks of one head share on per-query-head masks (union_stats.py).
. benchmarks/session.sh s21c4
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }  # after each step: a call cut at its limit still returns
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 60 python3 docs/experiments/kernel-speed/session21/union_stats.py --json "$R/union_stats.json" \
  > "$R/union_stats.log" 2>&1
step union-stats $?; grep "^{" "$R/union_stats.log" | cut -c1-200; save
timeout -k 10 200 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/prefill128k.json" > "$R/prefill128k.log" 2>&1
step prefill128k $?; grep -E "^T=" "$R/prefill128k.log" | cut -c1-260; save
finish
