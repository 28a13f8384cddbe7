#!/usr/bin/env bash
# Session 28, call 5 (on the device, repo root = main with the projection's register cap): the 32k time to first token
# with the benchmark's fresh gates and with `--gate-init local` (gates that score by distance).
. benchmarks/session.sh call5
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 5 70 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/ttft32k.json" > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300
timeout -k 5 70 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 --gate-init local \
  --json "$R/ttft32k_local.json" > "$R/ttft32k_local.log" 2>&1
step ttft32k_local $?; grep -E "^T=" "$R/ttft32k_local.log" | cut -c1-300
finish
