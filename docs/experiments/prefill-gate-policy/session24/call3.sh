#!/usr/bin/env bash
# Session 24, call 3 (on the device, repo root; carry .gpu/base = `git archive dbc7700 src benchmarks
# docs/experiments/prefill-gate-policy/gate_precision.py`): the scores kernel with 1 / sqrt(Dg) folded into the
# windows' inverse scales (a multiply a logit, no division) against dbc7700 in two alternating rounds, with three other
# scores tiles; the gate's GPU tests and its error against fp64; the selection's launch constants swept at the new
# lanes (select_bench.py --sweep).
. benchmarks/session.sh call3
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 150 python3 -m pytest -q -m gpu tests/test_gate_kernels.py tests/test_select_kernels.py \
  -p no:cacheprovider > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -3 "$R/gpu_tests.log"; save
for round in 1 2; do
  timeout -k 10 90 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts scores,gate \
    --scores-tiles 64,64,4,3 64,64,8,2 128,64,4,2 --json "$R/new$round.json" > "$R/new$round.log" 2>&1
  step new$round $?; cut -c1-120 "$R/new$round.log"; save
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 10 70 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
    --parts scores,gate --json "../../$R/base$round.json") > "$R/base$round.log" 2>&1
  step base$round $?; cut -c1-120 "$R/base$round.log"; save
done
timeout -k 10 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/precision.json" \
  > "$R/precision.log" 2>&1
step precision $?; tail -3 "$R/precision.log" | cut -c1-220; save
timeout -k 10 120 python3 docs/experiments/prefill-gate-policy/select_bench.py --sweep --json "$R/select_sweep.json" \
  > "$R/select_sweep.log" 2>&1
step select_sweep $?; cut -c1-160 "$R/select_sweep.log" | tail -40
finish
