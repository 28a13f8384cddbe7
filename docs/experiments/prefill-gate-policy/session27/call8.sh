#!/usr/bin/env bash
# Session 27, call 8 (on the device, repo root = wip/select-alu with the digit counts only (the branches of 756b03b
# reverted); carry .gpu/base = `git archive 43dd651 src benchmarks`, main): the digit counts alone, uncapped and under
# register caps of 72 and 64 (select_maxnreg.py), against main; one round (the session's last device time).
. benchmarks/session.sh call8
A=docs/experiments/prefill-gate-policy/session26/select_ab.py
M=docs/experiments/prefill-gate-policy/session27/select_maxnreg.py
(cd .gpu/base && PYTHONPATH=src:. timeout -k 5 60 python3 "../../$A" --tag base) 2>&1 | tee -a "$R/ab.log" | grep '"select"'
step base $?
for cap in 72 64; do
  timeout -k 5 60 python3 $M $cap --tag digits-cap$cap 2>&1 | tee -a "$R/ab.log" | grep '"select"\|Error'
  step cap$cap $?
done
timeout -k 5 60 python3 $A --tag digits 2>&1 | tee -a "$R/ab.log" | grep '"select"'
step digits $?
finish
