#!/usr/bin/env bash
# Session 27, call 5 (on the device, repo root = wip/proj-persistent; carry .gpu/base = `git archive main src
# benchmarks`): the persistent, flattened projection against main's, two alternating rounds (proj_ab.py).
. benchmarks/session.sh call5
A=docs/experiments/prefill-gate-policy/session27/proj_ab.py
for i in 1 2; do
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$A" --tag base$i) 2>&1 | tee -a "$R/proj_ab.log" | grep part
  step base$i $?
  timeout -k 5 150 python3 $A --tag new$i --ppsm 2,3,0 2>&1 | tee -a "$R/proj_ab.log" | grep part
  step new$i $?
done
finish
