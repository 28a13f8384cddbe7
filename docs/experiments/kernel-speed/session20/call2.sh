#!/usr/bin/env bash
# Session 20, call 2 (the working tree of this commit with the testbed's model and gates; .gpu/cur = f2a5879's src,
# call 1's "new"): the persistent forward's tiles heaviest first over the whole launch (query blocks slowest) against
# heaviest first within each (batch, head) (call 1). GPU tests; the steps benchmark and per-query-head 10 % at 32k,
# the two trees alternating; the time to first token at 32k and 128k (0.1, 0.05); the README's quickstart on the GPU
# (quality: session 17's numbers were dense 32.02913, seer@0.2 34.63930, passkey 1.00 / 1.00, density 0.204, recall
# 0.72179). No FA4 (device time left after the failed machine starts: one call, no second carry).
# Device call: carry .gpu/cur (the testbed's unused gate sets moved out of the tree to fit the carry).
. benchmarks/session.sh s20c2
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }  # after each step: a call cut at its limit still returns
timeout -k 10 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py -k "hopper_ws" \
  > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 8 "$R/gpu_tests.log" | cut -c1-300; save
for round in 1 2; do
  for tree in cur new; do
    P=src:.; [ $tree != new ] && P=.gpu/$tree/src:.
    PYTHONPATH=$P timeout -k 10 45 python3 docs/experiments/kernel-speed/session19/steps.py --rounds 1 \
      --json "$R/steps_${tree}_$round.json" > "$R/steps_${tree}_$round.log" 2>&1
    step steps-$tree-$round $?; save
    PYTHONPATH=$P timeout -k 10 45 python3 -m benchmarks.attention --rep 30 --seqlens 32768 --densities 0.1 \
      --block-sizes 64 --mask-heads hq --providers ours --json "$R/hq_${tree}_$round.json" > "$R/hq_${tree}_$round.log" 2>&1
    step hq-$tree-$round $?; grep -E "^llama" "$R/hq_${tree}_$round.log" | cut -c1-120; save
  done
done
timeout -k 10 200 python3 -m benchmarks.prefill --seqlens 32768,131072 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=" "$R/prefill.log"; save
timeout -k 10 100 python3 -m seerattn quickstart --device cuda --output "$R/qs" > "$R/quickstart.log" 2>&1
step quickstart $?; grep -A8 "^seerattn quickstart" "$R/quickstart.log"; head -c 1500 "$R/qs/quickstart.json"
finish
