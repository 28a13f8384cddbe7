#!/usr/bin/env bash
# session 15, call 2: DecodePolicy.bound_slots on the GPU: its GPU tests (fused kernel with forced picks, graphs,
# no host sync), the decode benchmark with the seer-bound provider next to seer-fused, and the passkey of dense /
# seer / seer_bound on the 22 test books with seed 0 (240 prompts).
. benchmarks/session.sh s15b
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_decode_select.py \
  tests/test_hf_graphs.py tests/test_hf_decode.py -k "bound or 32k or no_host_sync" > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 4 "$R/gpu_tests.log"
timeout 120 python3 -m benchmarks.decode --providers sdpa,ours,seer-fused,seer-bound --batches 1,16 \
  --contexts 32768,131072 --budgets 4096 --cuda-graph --json "$R/bench_decode.json" > "$R/bench_decode.log" 2>&1
step bench-decode $?; grep -E "seer|ours|sdpa" "$R/bench_decode.log" | tail -n 16
timeout 200 python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 \
  --budget-fraction 0.125 --tail 2048 --no-progress --data .gpu/books-test --seed 0 --measure passkey \
  --passkey-samples 48 --methods dense,seer,seer_bound --output "$R/test-seed0-passkey" > "$R/test-seed0-passkey.log" 2>&1
step passkey-test-seed0 $?; grep -E "decode passkey" "$R/test-seed0-passkey.log"
finish
