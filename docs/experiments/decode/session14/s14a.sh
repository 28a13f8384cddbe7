#!/usr/bin/env bash
# session 14, call 1: main's whole GPU test suite (never run to its end on this tree), then issue 17's passkey on
# books-sample with twice session 13's grid (48 prompts per depth, 240) for every decode method, on the H200.
. benchmarks/session.sh s14a
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 290 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --durations=20 tests > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 30 "$R/gpu_tests.log" | grep -E "passed|failed|FAILED|ERROR|error" | tail -n 12
timeout 240 python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 \
  --budget-fraction 0.125 --tail 2048 --no-progress --data data/books-sample --measure passkey \
  --passkey-samples 48 --methods dense,seer,seer_shift,quest,oracle --output "$R/sample-passkey" > "$R/sample-passkey.log" 2>&1
step sample-passkey $?; grep -E "passkey" "$R/sample-passkey.log" | tail -n 8
finish
