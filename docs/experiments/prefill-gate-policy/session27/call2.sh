#!/usr/bin/env bash
# Session 27, call 2 (on the device, repo root = wip/fused-select): the density selection fused into the scores
# kernel against the two launches (fused_ab.py).
. benchmarks/session.sh call2
timeout -k 10 300 python3 docs/experiments/prefill-gate-policy/session27/fused_ab.py --json "$R/fused_ab.json" \
  2>&1 | tee "$R/fused_ab.log"
step fused_ab $?
finish
