#!/usr/bin/env bash
# Session 27, call 6 (on the device, repo root = wip/select-alu; carry .gpu/base = `git archive 43dd651 src
# benchmarks`, main): the density selection's digit counts against main's compares, two alternating rounds of
# session 26's select_ab.py (lists hashed); the selection's GPU tests; Nsight Compute's instruction counts and pipe
# use of the new kernel (ncu_target.py).
. benchmarks/session.sh call6
A=docs/experiments/prefill-gate-policy/session26/select_ab.py
for i in 1 2; do
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$A" --tag base$i) 2>&1 | tee -a "$R/select_ab.log" | grep '"select"'
  step base$i $?
  timeout -k 5 100 python3 $A --tag new$i 2>&1 | tee -a "$R/select_ab.log" | grep '"select"'
  step new$i $?
done
timeout -k 5 200 python3 -m pytest -q -m gpu tests/test_select_kernels.py 2>&1 | tee "$R/gpu_tests.log" | tail -3
step gpu_tests $?
timeout -k 10 100 ncu --clock-control none --kernel-name _density_kernel --launch-skip 1 --launch-count 1 \
  --metrics gpu__time_duration.sum,smsp__inst_executed.sum,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,launch__registers_per_thread,sm__warps_active.avg.per_cycle_active \
  python3 docs/experiments/prefill-gate-policy/session27/ncu_target.py 2>&1 | tee "$R/ncu_new.log" | grep -E "_kernel|duration|inst_exec|pipe|regis|warps"
step ncu $?
finish
