#!/usr/bin/env bash
# Session 28, call 2 (on the device, repo root = wip/s28-combo: the selection from a row's common bits and the
# one-product projection; carry .gpu/base = `git archive main src benchmarks`, .gpu/s4 = the root's src with
# PROJ_SPLIT_TILE (64, 32, 4, 4)): the projection at 3 vs 4 stages (two alternating rounds), the gate's GPU tests on the
# root, then the time to first token at 32k (main and the root alternating, twice) and at 128k (the root).
. benchmarks/session.sh call2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
PROJ=docs/experiments/prefill-gate-policy/session27/proj_ab.py
for i in 1 2; do
  timeout -k 5 100 python3 $PROJ --tag s3_$i > "$R/proj_s3_$i.log" 2>&1
  step proj_s3_$i $?; grep part "$R/proj_s3_$i.log" | cut -c1-200
  (cd .gpu/s4 && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$PROJ" --tag s4_$i) > "$R/proj_s4_$i.log" 2>&1
  step proj_s4_$i $?; grep part "$R/proj_s4_$i.log" | cut -c1-200
done
timeout -k 5 150 python3 -m pytest -q -m gpu tests/test_gate_kernels.py -k "bf16_32k or host_sync" -p no:cacheprovider \
  > "$R/gate_gpu_tests.log" 2>&1
step gate_gpu_tests $?; tail -2 "$R/gate_gpu_tests.log"
for i in 1 2; do
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 10 90 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 \
    --warmup 1 --reps 2 --json "../../$R/ttft32k_base$i.json") > "$R/ttft32k_base$i.log" 2>&1
  step ttft32k_base$i $?; grep -E "^T=" "$R/ttft32k_base$i.log" | cut -c1-300
  timeout -k 10 90 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
    --json "$R/ttft32k_new$i.json" > "$R/ttft32k_new$i.log" 2>&1
  step ttft32k_new$i $?; grep -E "^T=" "$R/ttft32k_new$i.log" | cut -c1-300
done
timeout -k 10 150 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/ttft128k_new.json" > "$R/ttft128k_new.log" 2>&1
step ttft128k_new $?; grep -E "^T=" "$R/ttft128k_new.log" | cut -c1-300
finish
