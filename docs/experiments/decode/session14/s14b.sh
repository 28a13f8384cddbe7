#!/usr/bin/env bash
# session 14, call 2: the hybrid ranking hook (hybrid.py: N budget slots to Quest's bound, the rest by the decode gate)
# on the H200 in bf16: passkey on books-sample and the 22 test books (48 prompts per depth), decode PPL on the test
# books (64 windows); then the GPU test that failed in call 1, alone and verbose.
. benchmarks/session.sh s14b
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
H="python3 docs/experiments/decode/session14/hybrid.py --device cuda --samples 48"
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider -x --tb=long \
  "tests/test_decode_select.py::test_gpu_32k_batch_16_matches_eager_and_captures_in_a_graph" > "$R/select_test.log" 2>&1
step select-test $?; grep -E "passed|failed|Error|assert" "$R/select_test.log" | tail -n 8
timeout 170 $H --data data/books-sample --modes hyb0,hyb2,hyb4 --json "$R/sample_passkey.json" > "$R/sample_passkey.log" 2>&1
step sample-passkey $?; grep -E "right|answer" "$R/sample_passkey.log" | tail -n 20
timeout 120 $H --data .gpu/books-test --modes hyb0,hyb2 --json "$R/test_passkey.json" > "$R/test_passkey.log" 2>&1
step test-passkey $?; grep -E "right|answer" "$R/test_passkey.log" | tail -n 16
timeout 150 $H --data .gpu/books-test --measure ppl --windows 64 --modes hyb0,hyb2,hyb4 --json "$R/test_ppl.json" > "$R/test_ppl.log" 2>&1
step test-ppl $?; grep -E "PPL|vs" "$R/test_ppl.log"
finish
