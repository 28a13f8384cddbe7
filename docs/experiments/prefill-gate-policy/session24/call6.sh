#!/usr/bin/env bash
# Session 24, call 6 (on the device, repo root = the commit after 5370a35; carry .gpu/base = `git archive 5370a35 src
# benchmarks`): split rows without lo halves for a 16-bit input's max / min channels. The gate's error against fp64
# (bf16 inputs), pooling / projection / whole gate against 5370a35 in one call, the gate's GPU tests, the 32k TTFT.
. benchmarks/session.sh call6
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/precision.json" \
  > "$R/precision.log" 2>&1
step precision $?; tail -3 "$R/precision.log" | cut -c1-220; save
timeout -k 10 80 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts pool,proj,gate \
  --json "$R/new.json" > "$R/new.log" 2>&1
step new $?; grep -E "pool_pair|proj_pair|gate" "$R/new.log" | cut -c1-120; save
(cd .gpu/base && PYTHONPATH=src:. timeout -k 10 80 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
  --parts pool,proj,gate --json "../../$R/base.json") > "$R/base.log" 2>&1
step base $?; grep -E "pool_pair|proj_pair|gate" "$R/base.log" | cut -c1-120; save
timeout -k 10 90 python3 -m pytest -q -m gpu tests/test_gate_kernels.py -p no:cacheprovider > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -2 "$R/gpu_tests.log"; save
timeout -k 10 75 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/ttft32k.json" > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300
finish
