#!/usr/bin/env bash
# session 13, call 3: DecodePolicy.half_shift on the H200: replayed == eager generate (GPU tests), issue 17's decode
# evaluation (passkey by generation, decode PPL) of dense / seer / seer_shift on the corpus' 22 test books
# (.gpu/books-test), and the replayed 16-layer generate with and without it.
. benchmarks/session.sh s13c
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_hf_graphs.py > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 2 "$R/gpu_tests.log"
timeout 150 python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 \
  --budget-fraction 0.125 --tail 2048 --no-progress --data .gpu/books-test --samples 32 --passkey-samples 24 \
  --methods dense,seer,seer_shift --output "$R/books-test" > "$R/books-test.log" 2>&1
step books-test $?; grep -E "decode (passkey|ppl)" "$R/books-test.log" | tail -n 6
timeout 100 python3 -m benchmarks.generate --layers 16 --new 512 --warmup-prompt 8192 \
  --configs decode-graph,decode-shift-graph --json "$R/generate16.json" > "$R/generate16.log" 2>&1
step generate $?; grep "tok/s" "$R/generate16.log"
finish
