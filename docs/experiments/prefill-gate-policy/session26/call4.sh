#!/usr/bin/env bash
# Session 26, call 4 (on the device, repo root = wip/pool-order: the pooling programs ordered heads fastest; carry
# .gpu/base = `git archive a2a513d src benchmarks`, main): the whole gate A/B, two alternating rounds (the last of
# the session's device time).
. benchmarks/session.sh call4
G=docs/experiments/prefill-gate-policy/session26/gate_ab.py
for i in 1 2; do
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 5 60 python3 "../../$G" --tag base$i) 2>&1 | tee -a "$R/gate_ab.log" | grep part
  step base$i $?
  timeout -k 5 60 python3 $G --tag new$i 2>&1 | tee -a "$R/gate_ab.log" | grep part
  step new$i $?
done
grep '"part"' "$R/gate_ab.log"
finish
