#!/usr/bin/env bash
# Session 25, call 4 (on the device, repo root = main 8a46784 + two steps an iteration in the split projection and the
# scores kernel + the split weights kept on the gate; carry .gpu/base = `git archive 8a46784 src benchmarks`): the
# steps A/B with bit equality, the whole gate against 8a46784 in one call, the gate's GPU tests, the 32k TTFT.
. benchmarks/session.sh call4
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 120 python3 docs/experiments/prefill-gate-policy/session25/steps_ab.py --json "$R/steps.json" \
  > "$R/steps.log" 2>&1
step steps $?; grep -E "same|round 1" "$R/steps.log" | cut -c1-120
timeout -k 10 60 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts gate --json "$R/new.json" \
  > "$R/new.log" 2>&1
step new $?; grep -E "gate" "$R/new.log" | cut -c1-120
(cd .gpu/base && PYTHONPATH=src:. timeout -k 10 60 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
  --parts gate --json "../../$R/base.json") > "$R/base.log" 2>&1
step base $?; grep -E "gate" "$R/base.log" | cut -c1-120
timeout -k 10 90 python3 -m pytest -q -m gpu tests/test_gate_kernels.py -k "bf16_32k or host_sync" \
  -p no:cacheprovider > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -2 "$R/gpu_tests.log"
timeout -k 10 100 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/ttft32k.json" > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300
finish
