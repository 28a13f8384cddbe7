#!/usr/bin/env bash
# session 15, call 3: seer_bound's passkey on the other two haystacks (test books seed 1, books-sample seed 0; 240
# prompts each, seer's rows from calls 1 and session 14) and its decode PPL on the 22 test books (64 windows) with
# dense and seer in the same run.
. benchmarks/session.sh s15c
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
EV="python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 --budget-fraction 0.125 --tail 2048 --no-progress"
timeout 100 $EV --data .gpu/books-test --seed 1 --measure passkey --passkey-samples 48 --methods seer_bound \
  --output "$R/test-seed1-passkey" > "$R/test-seed1-passkey.log" 2>&1
step passkey-test-seed1 $?; grep -E "decode passkey" "$R/test-seed1-passkey.log"
timeout 100 $EV --data data/books-sample --seed 0 --measure passkey --passkey-samples 48 --methods seer_bound \
  --output "$R/sample-seed0-passkey" > "$R/sample-seed0-passkey.log" 2>&1
step passkey-sample-seed0 $?; grep -E "decode passkey" "$R/sample-seed0-passkey.log"
timeout 150 $EV --data .gpu/books-test --samples 64 --measure ppl --methods dense,seer,seer_bound \
  --output "$R/test-ppl64" > "$R/test-ppl64.log" 2>&1
step ppl-test $?; grep -E "ppl" "$R/test-ppl64.log" | tail -n 4
finish
