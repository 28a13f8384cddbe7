#!/usr/bin/env bash
# Session 17, device call 2 (issue 16): the density selection's width classes in one launch (this tree) against
# the tree before (79322c3's src, carried in .gpu/main_src), the GPU tests of the selection and the gate, and the
# projection's tiles around call 1's fastest, (32, 64, 4, 3) (mma.sync at 32 rows).
. benchmarks/session.sh s17c2
TILES="32,64,4,3 32,32,4,3 32,128,4,2 32,64,4,2 32,64,4,4 32,64,2,3 16,64,4,3 16,128,2,2 32,64,8,3 64,64,8,3 64,32,8,3"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_select_kernels.py \
  tests/test_gate_kernels.py > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
for round in 1 2; do
  PYTHONPATH=.gpu/main_src/src:. timeout 100 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
    --json "$R/parts_base_$round.json" > "$R/parts_base_$round.log" 2>&1
  step parts-base-$round $?; grep -E "select" "$R/parts_base_$round.log"
  timeout 100 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --json "$R/parts_new_$round.json" \
    > "$R/parts_new_$round.log" 2>&1
  step parts-new-$round $?; grep -E "select" "$R/parts_new_$round.log"
done
timeout 150 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --proj-tiles $TILES --json "$R/parts_tiles.json" \
  > "$R/parts_tiles.log" 2>&1
step parts-tiles $?; grep -E "proj_(q|k) " "$R/parts_tiles.log"
finish
