#!/usr/bin/env bash
# Session 27, call 4 (on the device, repo root = main): Nsight Compute stall reasons of the gate's and the selection's
# kernels at 32k (ncu_target.py; clocks not locked), and the projection's and the selection's SASS with their
# stall samples.
. benchmarks/session.sh call4
T=docs/experiments/prefill-gate-policy/session27/ncu_target.py
K='regex:_pool_kernel|_project_kernel|_gate_scores_kernel|_density_kernel'
timeout -k 10 200 ncu --clock-control none --kernel-name "$K" --launch-skip 4 --launch-count 4 \
  --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,gpu__time_duration.sum,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_uniform.avg.pct_of_peak_sustained_active,lts__t_bytes.sum,dram__bytes.sum' \
  python3 $T 2>&1 | tee "$R/stalls.log" | grep -v "^==PROF==" | grep -E "_kernel|stalled|duration|inst_executed|pipe|bytes" | \
  awk '{ if ($NF+0 > 0.05 || $0 ~ /_kernel|duration|bytes|inst_executed.sum/) print }'
step stalls $?
for k in _project_kernel _density_kernel _gate_scores_kernel; do
  timeout -k 10 150 ncu --clock-control none --kernel-name "$k" --launch-skip 1 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --page source --print-source sass --csv python3 $T \
    > "$R/source$k.csv" 2> "$R/source$k.err"
  step "source$k" $?
done
finish
