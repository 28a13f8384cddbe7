#!/usr/bin/env bash
# session 15, call 7: a fourth haystack for bound_slots: six train-split books the decode gates' distillation corpus
# did not draw from (testbed/train.py distill-corpus, 20 books, seed 1), passkey seed 2, 240 prompts, dense / seer /
# seer_bound in one run.
. benchmarks/session.sh s15g
timeout 190 python3 -m seerattn eval decode --model testbed/model --gates testbed/gates-decode --context 8192 \
  --budget-fraction 0.125 --tail 2048 --no-progress --data .gpu/books-train6 --split train --seed 2 --measure passkey \
  --passkey-samples 48 --methods dense,seer,seer_bound --output "$R/train6-seed2-passkey" > "$R/train6-seed2-passkey.log" 2>&1
step passkey-train6-seed2 $?; grep -E "decode passkey" "$R/train6-seed2-passkey.log"
finish
