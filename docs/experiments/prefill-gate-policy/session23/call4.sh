#!/usr/bin/env bash
# Session 23, call 4 (on the device, repo root; carry .gpu/base = `git archive c66d083 src benchmarks ...`): the final
# tree (split weights a column pair, cached row budgets): GPU tests of the gate and the selection, the time to first
# token at 32k against c66d083 in the same call and at 128k, each part of the gate and policy, the gate's error.
. benchmarks/session.sh call4
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 90 python3 -m pytest -q -m gpu tests/test_gate_kernels.py tests/test_select_kernels.py \
  > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -3 "$R/gpu_tests.log"; save
run() {  # run TREE NAME SEQLEN LIMIT
  (cd "$1" && PYTHONPATH=src:. timeout -k 10 "$4" python3 -m benchmarks.prefill --seqlens "$3" --densities 0.1 \
    --warmup 1 --reps 2 --json "$OLDPWD/$R/$2.json") > "$R/$2.log" 2>&1
}
run . new32k 32768 90; step new32k $?; grep -E "^T=" "$R/new32k.log" | cut -c1-300; save
run .gpu/base base32k 32768 90; step base32k $?; grep -E "^T=" "$R/base32k.log" | cut -c1-300; save
timeout -k 10 70 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts pool,proj,gate,select \
  --json "$R/parts.json" > "$R/parts.log" 2>&1
step parts $?; cut -c1-120 "$R/parts.log"; save
timeout -k 10 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/precision.json" \
  > "$R/precision.log" 2>&1
step precision $?; tail -3 "$R/precision.log" | cut -c1-220; save
run . new128k 131072 150; step new128k $?; grep -E "^T=" "$R/new128k.log" | cut -c1-300; save
finish
