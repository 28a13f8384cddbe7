#!/usr/bin/env bash
# Session 20, call 2 (the working tree of this commit; .gpu/cur = f2a5879's src, call 1's "new"): the persistent
# forward's tiles heaviest first over the whole launch (query blocks slowest) against heaviest first within each
# (batch, head) (call 1). GPU tests; the steps benchmark alternating the two trees; per-query-head 10 % at 32k, both
# trees; per-group 128k with FA4 and Flex in one process; the time to first token at 32k and 128k (0.1, 0.05).
# Device calls: carry .gpu/fa4a (command `ls .gpu/fa4a`), then at once carry .gpu/fa4b and .gpu/cur and run this.
. benchmarks/session.sh s20c2
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }  # after each step: a call cut at its limit still returns
. benchmarks/fa4_payload.sh install
step fa4-install $?
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
timeout -k 10 100 python3 -m benchmarks.attention --rep 30 --seqlens 131072 --densities 0.1 --block-sizes 64,128 \
  --mask-heads hkv --providers ours,flex,fa4 --json "$R/sweep128k.json" > "$R/sweep128k.log" 2>&1
step sweep128k $?; grep -E "^llama" "$R/sweep128k.log" | cut -c1-120; save
timeout -k 10 200 python3 -m benchmarks.prefill --seqlens 32768,131072 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=" "$R/prefill.log"
finish
