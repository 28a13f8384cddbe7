#!/usr/bin/env bash
# session 14, call 3: the decode-selection GPU test with its bf16 tolerance, the rest of the GPU suite that call 1 did
# not reach (.gpu/rest_ids.txt: the last 39 of the 94 GPU tests in collection order), issue 17's decode PPL on the
# 22 test books with 64 windows through the library, and the hybrid hook's passkey (hyb2) on the test books.
. benchmarks/session.sh s14c
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short \
  "tests/test_decode_select.py::test_gpu_32k_batch_16_matches_eager_and_captures_in_a_graph" > "$R/select_test.log" 2>&1
step select-test $?; tail -n 3 "$R/select_test.log"
timeout 280 python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short $(cat .gpu/rest_ids.txt) > "$R/gpu_rest.log" 2>&1
step gpu-rest $?; grep -E "FAILED|ERROR|passed|failed" "$R/gpu_rest.log" | tail -n 12
timeout 90 python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 \
  --budget-fraction 0.125 --tail 2048 --no-progress --data .gpu/books-test --samples 64 --measure ppl \
  --methods dense,seer,quest,streaming,oracle --output "$R/test-ppl64" > "$R/test-ppl64.log" 2>&1
step test-ppl64 $?; grep -E "ppl" "$R/test-ppl64.log" | tail -n 8
timeout 90 python3 docs/experiments/decode/session14/hybrid.py --device cuda --samples 48 --data .gpu/books-test \
  --modes hyb2 --json "$R/test_passkey_hyb2.json" > "$R/test_passkey_hyb2.log" 2>&1
step test-passkey-hyb2 $?; grep -E "right|answer" "$R/test_passkey_hyb2.log" | tail -n 12
finish
