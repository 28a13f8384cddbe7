#!/usr/bin/env bash
# Session 17, device call 3 (issue 16): this tree (the density classes in one launch, the projection at (32, 32, 4, 3))
# against 79322c3's src (.gpu/main_src): GPU tests of the selection and the gate, the selection alone (two alternating
# rounds), the projection's tiles around (32, 32, 4, 3), the gate's accuracy, and the time to first token (32k for
# both trees, 128k for this one).
. benchmarks/session.sh s17c3
BASE=.gpu/main_src/src:.
TILES="32,16,4,3 32,16,4,4 32,32,4,4 32,32,4,2 32,16,4,5 32,32,8,3 32,16,8,4 16,32,4,3"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_select_kernels.py \
  tests/test_gate_kernels.py > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
for round in 1 2; do
  PYTHONPATH=$BASE timeout 60 python3 -m benchmarks.gate_parts --parts select --json "$R/select_base_$round.json" \
    > "$R/select_base_$round.log" 2>&1
  step select-base-$round $?; grep -E "select" "$R/select_base_$round.log"
  timeout 60 python3 -m benchmarks.gate_parts --parts select --json "$R/select_new_$round.json" \
    > "$R/select_new_$round.log" 2>&1
  step select-new-$round $?; grep -E "select" "$R/select_new_$round.log"
done
timeout 90 python3 -m benchmarks.gate_parts --parts proj,gate --proj-tiles $TILES --json "$R/proj_tiles.json" \
  > "$R/proj_tiles.log" 2>&1
step proj-tiles $?; grep -E "proj_(q|k) |gate " "$R/proj_tiles.log"
timeout 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/gate_precision.json" \
  > "$R/gate_precision.log" 2>&1
step gate-precision $?; tail -n 6 "$R/gate_precision.log"
PYTHONPATH=$BASE timeout 80 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/prefill32k_base.json" > "$R/prefill32k_base.log" 2>&1
step prefill-32k-base $?; grep -E "^T=" "$R/prefill32k_base.log"
timeout 80 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/prefill32k_new.json" > "$R/prefill32k_new.log" 2>&1
step prefill-32k-new $?; grep -E "^T=" "$R/prefill32k_new.log"
timeout 200 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/prefill128k.json" > "$R/prefill128k.log" 2>&1
step prefill-128k $?; grep -E "^T=" "$R/prefill128k.log"
finish
