#!/usr/bin/env bash
# Branch wip/scores-fp16 (session 23, not timed: no device time was left), to run first on the device, repo root, with
# carry .gpu/base = `git archive 6d73414 src benchmarks docs/experiments/prefill-gate-policy/gate_precision.py` (main
# before the branch): the scores kernel on fp16 halves (keys split by the projection's epilogue, windows split or split
# once in the kernel) against main's TF32 split, in one call. Merge if the gate is faster at the same error.
. benchmarks/session.sh scores_fp16
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 150 python3 -m pytest -q -m gpu tests/test_gate_kernels.py > "$R/gpu_gate_tests.log" 2>&1
step gate_tests $?; tail -3 "$R/gpu_gate_tests.log"; save
for round in 1 2; do
  timeout -k 10 100 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts scores,gate \
    --scores-tiles 128,64,4,2 64,128,4,2 64,64,4,3 128,64,8,2 --json "$R/branch$round.json" > "$R/branch$round.log" 2>&1
  step branch$round $?; cut -c1-120 "$R/branch$round.log"; save
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 10 80 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
    --parts scores,gate --json "../../$R/main$round.json") > "$R/main$round.log" 2>&1
  step main$round $?; cut -c1-120 "$R/main$round.log"; save
done
timeout -k 10 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/precision.json" \
  > "$R/precision.log" 2>&1
step precision $?; tail -3 "$R/precision.log" | cut -c1-220
finish
