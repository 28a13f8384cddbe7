#!/usr/bin/env bash
# Session 27, call 1 (on the device, repo root = main): the gate's and the selection's kernels inside the model's
# forward against the same kernels launched alone on the captured inputs (inmodel.py), with the SM clock and power
# sampled every 50 ms beside it.
. benchmarks/session.sh call1
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv -lms 50 \
  > "$R/smi.csv" 2>&1 &
SMI=$!
timeout -k 10 420 python3 docs/experiments/prefill-gate-policy/session27/inmodel.py --layers 8 --json "$R/inmodel.json" \
  2>&1 | tee "$R/inmodel.log"
step inmodel $?
kill $SMI
finish
