#!/usr/bin/env bash
# Session 24, call 4 (on the device, repo root = 19e7544): the time to first token of the final tree at 32k (density
# 0.1) and 128k (densities 0.1 and 0.05), each with its per-part breakdown (fresh gates, Llama-3.1-8B shapes).
. benchmarks/session.sh call4
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 120 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/ttft32k.json" > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300; save
timeout -k 10 240 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/ttft128k.json" > "$R/ttft128k.log" 2>&1
step ttft128k $?; grep -E "^T=" "$R/ttft128k.log" | cut -c1-300
finish
