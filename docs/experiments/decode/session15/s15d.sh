#!/usr/bin/env bash
# session 15, call 4: the bound's Triton kernel (quest_bound_scores) on the GPU: its tests and the HF ones with
# bound_slots (no host sync, graphs), the decode step benchmark (seer-bound vs seer-fused), generate with and without
# the bound (8 layers, replayed), and seer_bound's passkey (test books, seed 0) and PPL again through the kernel.
. benchmarks/session.sh s15d
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_decode_select.py \
  tests/test_hf_graphs.py tests/test_hf_decode.py -k "bound or no_host_sync" > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 4 "$R/gpu_tests.log"
timeout 120 python3 -m benchmarks.decode --providers sdpa,ours,seer-fused,seer-bound --batches 1,16 \
  --contexts 32768,131072 --budgets 4096 --cuda-graph --json "$R/bench_decode.json" > "$R/bench_decode.log" 2>&1
step bench-decode $?; grep -E "seer|ours|sdpa" "$R/bench_decode.log" | tail -n 16
timeout 150 python3 -m benchmarks.generate --layers 8 --new 128 --warmup-prompt 8192 \
  --configs decode-graph,decode-bound-graph --json "$R/generate.json" > "$R/generate.log" 2>&1
step generate $?; tail -n 6 "$R/generate.log"
EV="python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 --budget-fraction 0.125 --tail 2048 --no-progress"
timeout 100 $EV --data .gpu/books-test --seed 0 --measure passkey --passkey-samples 48 --methods seer_bound \
  --output "$R/test-seed0-passkey" > "$R/test-seed0-passkey.log" 2>&1
step passkey-test-seed0 $?; grep -E "decode passkey" "$R/test-seed0-passkey.log"
timeout 100 $EV --data .gpu/books-test --samples 64 --measure ppl --methods seer_bound \
  --output "$R/test-ppl64" > "$R/test-ppl64.log" 2>&1
step ppl-test $?; grep -E "decode ppl" "$R/test-ppl64.log" | tail -n 2
finish
