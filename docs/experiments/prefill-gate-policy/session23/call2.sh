#!/usr/bin/env bash
# Session 23, call 2 (on the device, repo root): the split projection with each step's three products summed from
# zero and added to the running sums in fp32 (STEP_SUMS, the candidate) against call 1's variant (hi.hi chained in the
# tensor cores' accumulator, the small products in their own), time and error in one call; then the Hopper kernel's
# GPU tests that session 22 could not re-run on its final tree.
. benchmarks/session.sh call2
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
variant() {  # variant STEP_SUMS NAME TILES...
  local sums=$1 name=$2; shift 2
  timeout -k 10 120 python3 -c "
import runpy, sys
from seerattn.ops._triton import gate_fwd
gate_fwd.STEP_SUMS = $sums
from benchmarks.gate_parts import main
main(['--seqlens', '32768,131072', '--parts', 'proj,gate', '--json', '$R/parts_$name.json'] + (['--proj-tiles', *sys.argv[1:]] if sys.argv[1:] else []))
sys.argv = ['gate_precision.py', '--json', '$R/precision_$name.json']
runpy.run_path('docs/experiments/prefill-gate-policy/gate_precision.py', run_name='__main__')
" "$@" > "$R/$name.log" 2>&1
}
variant True sums 64,16,4,4 64,64,4,2 64,32,8,3 128,32,8,3 32,32,4,3 32,64,4,2; step sums $?
grep -v "^$" "$R/sums.log" | cut -c1-150; save
variant False chained; step chained $?; grep -v "^$" "$R/chained.log" | cut -c1-150; save
variant True sums2; step sums2 $?; grep -v "^$" "$R/sums2.log" | cut -c1-150; save
timeout -k 10 100 python3 -m pytest -q -m gpu tests/test_gate_kernels.py > "$R/gpu_gate_tests.log" 2>&1
step gate_tests $?; tail -3 "$R/gpu_gate_tests.log"; save
left=$(( 560 - ($(date +%s) - S) ))
timeout -k 10 $left python3 -m pytest -q -m gpu tests/test_gpu_kernels.py -k "hopper_ws or every_sparse_config" \
  > "$R/gpu_kernel_tests.log" 2>&1
step kernel_tests $?; tail -5 "$R/gpu_kernel_tests.log"
finish
