#!/usr/bin/env bash
# session 15, call 1: the decode-selection GPU test with its bf16 tolerance (written in session 14, not yet run on a
# GPU), then the hybrid ranking on a haystack disjoint from session 14's (22 test books, passkey seed 1: other keys,
# other offsets), 240 prompts, with the library's dense / seer / Quest rows in the same call.
. benchmarks/session.sh s15a
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 70 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_decode_select.py > "$R/select_test.log" 2>&1
step select-test $?; tail -n 3 "$R/select_test.log"
timeout 200 python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 \
  --budget-fraction 0.125 --tail 2048 --no-progress --data .gpu/books-test --seed 1 --measure passkey \
  --passkey-samples 48 --methods dense,seer,quest --output "$R/test-seed1-passkey" > "$R/test-seed1-passkey.log" 2>&1
step lib-passkey $?; tail -n 8 "$R/test-seed1-passkey.log"
timeout 180 python3 docs/experiments/decode/session14/hybrid.py --device cuda --samples 48 --seed 1 \
  --data .gpu/books-test --modes hyb0,hyb2 --json "$R/test_seed1_hyb.json" > "$R/test_seed1_hyb.log" 2>&1
step hybrid $?; grep -E "right|answer" "$R/test_seed1_hyb.log" | tail -n 12
finish
