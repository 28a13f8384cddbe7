#!/usr/bin/env bash
# Session 27, call 7 (on the device, repo root = wip/select-alu; carry .gpu/base = `git archive 43dd651 src
# benchmarks` (main) and .gpu/bonly = the branch with main's compares restored (the branches for forced blocks and
# dense rows only)): which part of wip/select-alu gains, and the digit counts under register caps of 80 and 72.
. benchmarks/session.sh call7
A=docs/experiments/prefill-gate-policy/session26/select_ab.py
M=docs/experiments/prefill-gate-policy/session27/select_maxnreg.py
for i in 1 2; do
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$A" --tag base$i) 2>&1 | tee -a "$R/ab.log" | grep '"select"'
  step base$i $?
  (cd .gpu/bonly && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$A" --tag bonly$i) 2>&1 | tee -a "$R/ab.log" | grep '"select"'
  step bonly$i $?
  timeout -k 5 100 python3 $A --tag new$i 2>&1 | tee -a "$R/ab.log" | grep '"select"'
  step new$i $?
  for cap in 80 $([ $i = 1 ] && echo 72); do
    timeout -k 5 100 python3 $M $cap --tag cap$cap-$i 2>&1 | tee -a "$R/ab.log" | grep '"select"\|Error'
    step cap$cap-$i $?
  done
done
finish
