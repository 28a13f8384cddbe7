#!/usr/bin/env bash
# session 15, call 5: bound_slots with its three launches (BlockBounds.update's kernel, quest_bound_scores,
# top_block_indices): the GPU tests, the decode step benchmark (seer-bound vs seer-fused), generate with and without
# the bound in both orders (8 layers, replayed), and seer_bound's passkey on the test books (seed 0) once more.
. benchmarks/session.sh s15e
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_decode_select.py \
  tests/test_hf_graphs.py tests/test_hf_decode.py tests/test_kcache_kernels.py -k "bound or no_host_sync" \
  > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 4 "$R/gpu_tests.log"
timeout 120 python3 -m benchmarks.decode --providers sdpa,ours,seer-fused,seer-bound --batches 1,16,64 \
  --contexts 32768,131072 --budgets 4096 --cuda-graph --json "$R/bench_decode.json" > "$R/bench_decode.log" 2>&1
step bench-decode $?; grep -E "seer|ours|sdpa" "$R/bench_decode.log" | tail -n 24
for order in decode-graph,decode-bound-graph decode-bound-graph,decode-graph; do
  timeout 100 python3 -m benchmarks.generate --layers 8 --new 256 --warmup-prompt 8192 --configs $order \
    --json "$R/generate-${order%%,*}-first.json" > "$R/generate-${order%%,*}-first.log" 2>&1
  step "generate $order" $?; grep -E "tok/s" "$R/generate-${order%%,*}-first.log"
done
timeout 100 python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 \
  --budget-fraction 0.125 --tail 2048 --no-progress --data .gpu/books-test --seed 0 --measure passkey \
  --passkey-samples 48 --methods seer_bound --output "$R/test-seed0-passkey" > "$R/test-seed0-passkey.log" 2>&1
step passkey-test-seed0 $?; grep -E "decode passkey" "$R/test-seed0-passkey.log"
finish
