#!/usr/bin/env bash
# Prepared in session 27, not run (the session's device time was spent). On the device, repo root = wip/proj-n128
# (the split projection as one [64, 128] product a step instead of two [64, 64]: offline sm_90 206 registers against
# 255, 6 HGMMA and 3 wgmma waits a loop against 12 and 6); carry .gpu/base = `git archive main src benchmarks`.
# Two alternating rounds of proj_ab.py (the projection and the whole gate, outputs hashed), then the gate's GPU tests.
. benchmarks/session.sh proj_n128
A=docs/experiments/prefill-gate-policy/session27/proj_ab.py
for i in 1 2; do
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$A" --tag base$i) 2>&1 | tee -a "$R/proj_ab.log" | grep part
  step base$i $?
  timeout -k 5 100 python3 $A --tag new$i 2>&1 | tee -a "$R/proj_ab.log" | grep part
  step new$i $?
done
timeout -k 5 200 python3 -m pytest -q -m gpu tests/test_gate_kernels.py 2>&1 | tee "$R/gpu_tests.log" | tail -3
step gpu_tests $?
finish
