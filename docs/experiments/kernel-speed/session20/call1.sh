#!/usr/bin/env bash
# Session 20, call 1 (the working tree of this commit; .gpu/prev = d08974e's src, session 19's kernel; .gpu/pipe =
# 29d7040's src, the math warpgroups software-pipelined only; .gpu/persist = 4e50f4f's src, pipelined and persistent):
# the Hopper forward software-pipelined, persistent, and without list loads in the math before the diagonal; .gpu/ping
# = this tree with pingpong.patch applied (FlashAttention-3's ping-pong through named barriers, per-group kernel).
# GPU tests of the warp-specialised forward; the steps benchmark alternating the five trees (separate processes);
# the 32k sweeps with FA4 and Flex in one process (per group: all blocks and 10 %, blocks 64 / 128; per query head:
# 10 %, block 64); the time to first token at 32k and 128k.
# Device calls: carry .gpu/fa4a (command `ls .gpu/fa4a`), then at once carry .gpu/fa4b, .gpu/prev, .gpu/pipe, .gpu/persist,
# .gpu/ping.
. benchmarks/session.sh s20c1
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }  # after each step: a call cut at its limit still returns
. benchmarks/fa4_payload.sh install
step fa4-install $?
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py -k "hopper_ws" \
  > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 8 "$R/gpu_tests.log" | cut -c1-300; save
steps() {  # one round of the steps benchmark over the trees given
  for tree in "$@"; do
    P=src:.; [ $tree != new ] && P=.gpu/$tree/src:.
    PYTHONPATH=$P timeout -k 10 45 python3 docs/experiments/kernel-speed/session19/steps.py --rounds 1 \
      --json "$R/steps_${tree}_$round.json" > "$R/steps_${tree}_$round.log" 2>&1
    step steps-$tree-$round $?; cut -c1-110 "$R/steps_${tree}_$round.log"; save
  done
}
round=1 steps prev pipe persist new ping
timeout -k 10 120 python3 -m benchmarks.attention --rep 30 --seqlens 32768 --densities 1.0,0.1 --block-sizes 64,128 \
  --mask-heads hkv --providers ours,flex,fa4 --sweep --json "$R/sweep32k.json" > "$R/sweep32k.log" 2>&1
step sweep32k $?; grep -E "^llama" "$R/sweep32k.log" | cut -c1-120; save
timeout -k 10 150 python3 -m benchmarks.prefill --seqlens 32768,131072 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=" "$R/prefill.log"; save
round=2 steps ping new persist pipe prev
timeout -k 10 60 python3 -m benchmarks.attention --rep 30 --seqlens 32768 --densities 0.1 --block-sizes 64 \
  --mask-heads hq --providers ours,flex,fa4 --sweep --json "$R/sweep32k_hq.json" > "$R/sweep32k_hq.log" 2>&1
step sweep32k-hq $?; grep -E "^llama" "$R/sweep32k_hq.log" | cut -c1-120
finish
