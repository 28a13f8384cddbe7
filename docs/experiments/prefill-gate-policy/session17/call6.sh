#!/usr/bin/env bash
# Session 17, device call 6 (issue 16, the 32k share): the projection's max / min channels (exact in TF32 for bf16
# inputs) on two TF32 products instead of tf32x3's three (this tree, uncommitted) against 6af7da7 (src and benchmarks
# in .gpu/main_src): GPU gate tests, the gate's accuracy, the projection and the whole gate in two alternating rounds.
. benchmarks/session.sh s17c6
TILES="32,16,4,3 32,16,4,4 32,32,4,2"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gate_kernels.py > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
timeout 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/gate_precision.json" \
  > "$R/gate_precision.log" 2>&1
step gate-precision $?; grep tf32x3 "$R/gate_precision.log"
for round in 1 2; do
  (cd .gpu/main_src && PYTHONPATH=src:. timeout 60 python3 -m benchmarks.gate_parts --parts proj,gate \
    --json "$OLDPWD/$R/base_$round.json") > "$R/base_$round.log" 2>&1
  step base-$round $?; grep -E "proj_(q|k|pair) |gate" "$R/base_$round.log"
  timeout 60 python3 -m benchmarks.gate_parts --parts proj,gate --json "$R/new_$round.json" > "$R/new_$round.log" 2>&1
  step new-$round $?; grep -E "proj_(q|k|pair) |gate" "$R/new_$round.log"
done
timeout 60 python3 -m benchmarks.gate_parts --parts proj --proj-tiles $TILES --json "$R/new_tiles.json" \
  > "$R/new_tiles.log" 2>&1
step new-tiles $?; grep -E "proj_(q|k) " "$R/new_tiles.log"
finish
