#!/usr/bin/env bash
# Session 26, call 3 (on the device, repo root = main with wip/select-vec merged): the README quickstart on the GPU
# (the sparse path now hands the gate's causal_only logits to the selection: the perplexities must not move), the
# density kernel's launch constants swept at NQ 512 / 2048, and a second 32k time to first token.
. benchmarks/session.sh call3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 110 python3 -m seerattn quickstart --device cuda --output "$R/qs" > "$R/quickstart.log" 2>&1
step quickstart $?; grep "ppl seer\|ppl dense\|passkey" "$R/quickstart.log" | head -5; rm -f "$R/qs/gate_vs_truth.png"
timeout -k 10 120 python3 docs/experiments/prefill-gate-policy/session26/select_ab.py --sweep --tag sweep \
  --json "$R/sweep.json" > "$R/sweep.log" 2>&1
step sweep $?; grep -h '"sweep-' "$R/sweep.log" | cut -c1-160
timeout -k 10 130 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/ttft32k.json" > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300
finish
