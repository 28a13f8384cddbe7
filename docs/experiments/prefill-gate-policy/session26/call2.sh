#!/usr/bin/env bash
# Session 26, call 2 (on the device, repo root = wip/proj-two: wip/select-vec + two products in the projection's
# max / min steps; carry .gpu/base = `git archive 7c83159 src benchmarks`, wip/select-vec): the whole gate A/B
# (two alternating rounds, causal logits hashed) with the selection's padding ablation, the candidate's gate GPU tests,
# then the TTFT at 32k and 128k (densities 0.1 and 0.05) on wip/select-vec.
. benchmarks/session.sh call2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
AB=docs/experiments/prefill-gate-policy/session26/select_ab.py
for i in 1 2; do
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 10 120 python3 "../../$AB" --gate --tag base$i --json "../../$R/base$i.json") \
    > "$R/base$i.log" 2>&1
  step base$i $?
  timeout -k 10 120 python3 $AB --gate --nopad --tag new$i --json "$R/new$i.json" > "$R/new$i.log" 2>&1
  step new$i $?
done
grep -h '"part"' "$R"/base1.log "$R"/new1.log "$R"/base2.log "$R"/new2.log | grep -v scores | cut -c1-160
timeout -k 10 120 python3 -m pytest -q -m gpu tests/test_gate_kernels.py -k "bf16_32k or host_sync" \
  -p no:cacheprovider > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -2 "$R/gpu_tests.log"
(cd .gpu/base && PYTHONPATH=src:. timeout -k 10 130 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 \
  --warmup 1 --reps 2 --json "../../$R/ttft32k.json") > "$R/ttft32k.log" 2>&1
step ttft32k $?; grep -E "^T=" "$R/ttft32k.log" | cut -c1-300
(cd .gpu/base && PYTHONPATH=src:. timeout -k 10 240 python3 -m benchmarks.prefill --seqlens 131072 \
  --densities 0.1,0.05 --warmup 1 --reps 2 --json "../../$R/ttft128k.json") > "$R/ttft128k.log" 2>&1
step ttft128k $?; grep -E "^T=" "$R/ttft128k.log" | cut -c1-300
finish
