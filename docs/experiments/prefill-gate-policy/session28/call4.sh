#!/usr/bin/env bash
# Session 28, call 4 (on the device, repo root = main; carry .gpu/p160 = the root's src and benchmarks with the
# projection launched under maxnreg=160: 3 programs an SM instead of 2, offline sm_90 160 registers, no spill): the
# projection and the whole gate (two alternating rounds, outputs hashed), the gate's GPU tests on p160, then the 32k
# time to first token alternating (twice).
. benchmarks/session.sh call4
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
PROJ=docs/experiments/prefill-gate-policy/session27/proj_ab.py
for i in 1 2; do
  timeout -k 5 100 python3 $PROJ --tag base$i > "$R/proj_base$i.log" 2>&1
  step proj_base$i $?; grep part "$R/proj_base$i.log" | cut -c1-200
  (cd .gpu/p160 && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$PROJ" --tag p160_$i) > "$R/proj_p160_$i.log" 2>&1
  step proj_p160_$i $?; grep part "$R/proj_p160_$i.log" | cut -c1-200
done
(cd .gpu/p160 && PYTHONPATH=src:. timeout -k 5 150 python3 -m pytest -q -m gpu ../../tests/test_gate_kernels.py \
  -k "bf16_32k or host_sync" -p no:cacheprovider) > "$R/gate_gpu_tests.log" 2>&1
step gate_gpu_tests $?; tail -2 "$R/gate_gpu_tests.log"
for i in 1 2; do
  timeout -k 10 90 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
    --json "$R/ttft32k_base$i.json" > "$R/ttft32k_base$i.log" 2>&1
  step ttft32k_base$i $?; grep -E "^T=" "$R/ttft32k_base$i.log" | cut -c1-300
  (cd .gpu/p160 && PYTHONPATH=src:. timeout -k 10 90 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 \
    --warmup 1 --reps 2 --json "../../$R/ttft32k_p160_$i.json") > "$R/ttft32k_p160_$i.log" 2>&1
  step ttft32k_p160_$i $?; grep -E "^T=" "$R/ttft32k_p160_$i.log" | cut -c1-300
done
finish
