#!/usr/bin/env bash
# Session 25, call 1 (on the device, repo root = 8a46784): what session 24 left un-run on its final tree (the README
# quickstart on the GPU, the 128k time to first token), and one 32k forward's top GPU ops (torch.profiler) to see what
# the gate and policy ranges hold in the model beside the kernels gate_parts replays.
. benchmarks/session.sh call1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 110 python3 -m seerattn quickstart --device cuda --output "$R/qs" > "$R/quickstart.log" 2>&1
step quickstart $?; grep "ppl seer\|ppl dense\|passkey" "$R/quickstart.log" | head -5; rm -f "$R/qs/gate_vs_truth.png"
timeout -k 10 100 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 --profile 45 \
  --json "$R/ttft32k.json" > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300
timeout -k 10 200 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/ttft128k.json" > "$R/ttft128k.log" 2>&1
step ttft128k $?; grep -E "^T=" "$R/ttft128k.log" | cut -c1-300
finish
