#!/usr/bin/env bash
# Session 28, call 3 (on the device, repo root = main `e51c6d8`: session 28's changes merged; carry .gpu/base = `git
# archive f8dc7e2 src benchmarks`): the README quickstart on the GPU (the perplexities and passkeys must not move), a
# third 32k time to first token on main, and 32k with `--gate-init local` (gates that score by distance: banded masks,
# other logits) on main and on f8dc7e2.
. benchmarks/session.sh call3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 110 python3 -m seerattn quickstart --device cuda --output "$R/qs" > "$R/quickstart.log" 2>&1
step quickstart $?; grep "ppl seer\|ppl dense\|passkey" "$R/quickstart.log" | head -5; rm -f "$R/qs/gate_vs_truth.png"
timeout -k 10 90 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/ttft32k.json" > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300
timeout -k 10 90 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 --gate-init local \
  --json "$R/ttft32k_local.json" > "$R/ttft32k_local.log" 2>&1
step ttft32k_local $?; grep -E "^T=" "$R/ttft32k_local.log" | cut -c1-300
(cd .gpu/base && PYTHONPATH=src:. timeout -k 10 90 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 \
  --warmup 1 --reps 2 --gate-init local --json "../../$R/ttft32k_local_base.json") > "$R/ttft32k_local_base.log" 2>&1
step ttft32k_local_base $?; grep -E "^T=" "$R/ttft32k_local_base.log" | cut -c1-300
finish
