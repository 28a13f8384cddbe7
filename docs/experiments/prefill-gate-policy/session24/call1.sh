#!/usr/bin/env bash
# Session 24, call 1 (on the device, repo root = main 66941c4; carry .gpu/branch = `git archive` of wip/scores-fp16
# rebased on main (src benchmarks tests docs/experiments/prefill-gate-policy/gate_precision.py pyproject.toml)):
# the README's quickstart on the GPU with the split gate (against session 16/22: dense 32.02913, seer@0.2 34.63930),
# then the branch's scores kernel on fp16 halves against main's in one call (GPU gate tests, gate parts, error).
. benchmarks/session.sh call1
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 110 python3 -m seerattn quickstart --device cuda --output "$R/qs" > "$R/quickstart.log" 2>&1
step quickstart $?; grep -A6 "^seerattn quickstart" "$R/quickstart.log"; grep "ppl seer\|ppl dense" "$R/quickstart.log"; save
(cd .gpu/branch && PYTHONPATH=src:. timeout -k 10 150 python3 -m pytest -q -m gpu tests/test_gate_kernels.py -p no:cacheprovider) \
  > "$R/branch_gate_tests.log" 2>&1
step branch_gate_tests $?; tail -3 "$R/branch_gate_tests.log"; save
for round in 1 2; do
  (cd .gpu/branch && PYTHONPATH=src:. timeout -k 10 90 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
    --parts scores,gate --scores-tiles 128,64,4,2 64,128,4,2 64,64,4,3 128,64,8,2 --json "../../$R/branch$round.json") \
    > "$R/branch$round.log" 2>&1
  step branch$round $?; cut -c1-120 "$R/branch$round.log"; save
  timeout -k 10 70 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts scores,gate \
    --json "$R/main$round.json" > "$R/main$round.log" 2>&1
  step main$round $?; cut -c1-120 "$R/main$round.log"; save
done
(cd .gpu/branch && PYTHONPATH=src:. timeout -k 10 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py \
  --json "../../$R/precision_branch.json") > "$R/precision_branch.log" 2>&1
step precision_branch $?; tail -3 "$R/precision_branch.log" | cut -c1-220
finish
