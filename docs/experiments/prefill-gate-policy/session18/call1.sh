#!/usr/bin/env bash
# Prepared in session 17, run as session 18 call 1 (tree of 43226e0): proj_exact.patch, call 6's two-term
# projection for the max / min channels with the small products in their own running sums (call 6's version folded
# them into the main sum on the tensor cores: error 2.3e-6, the GPU test failed). Applies to 6af7da7's successors;
# the device's copy of the tree is patched in place and restored at the end.
. benchmarks/session.sh s17c7
P=docs/experiments/prefill-gate-policy/session17/proj_exact.patch
timeout 100 python3 -m benchmarks.gate_parts --parts proj,gate --json "$R/base.json" > "$R/base.log" 2>&1
step base $?; grep -E "proj_(q|k|pair) |gate" "$R/base.log"
git apply "$P" && step patch-applied 0 || step patch-applied 1
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gate_kernels.py > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
timeout 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/gate_precision.json" \
  > "$R/gate_precision.log" 2>&1
step gate-precision $?; grep tf32x3 "$R/gate_precision.log"
timeout 100 python3 -m benchmarks.gate_parts --parts proj,gate --proj-tiles 32,16,4,3 32,16,4,4 \
  --json "$R/new.json" > "$R/new.log" 2>&1
step new $?; grep -E "proj_(q|k|pair) |gate" "$R/new.log"
git apply -R "$P" && step patch-reverted 0 || step patch-reverted 1
finish
