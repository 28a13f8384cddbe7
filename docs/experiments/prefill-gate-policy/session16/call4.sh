#!/usr/bin/env bash
# Session 16, device call 4 (issue 16): the projection with its weights split into TF32 halves once per call and its
# rows split in registers (tl.dot's tf32x3 no longer re-splits in every step), the scores tile (64, 64, 4, 2). GPU
# tests of the gate, the selection and the sparse layer's no-host-sync path; the parts (projection tiles); the
# gate's accuracy against fp64 per precision; the time to first token.
. benchmarks/session.sh s16c4
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gate_kernels.py \
  tests/test_gpu_kernels.py::test_sparse_layer_path_has_no_host_sync > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
timeout 150 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --proj-tiles 128,32,8,2 128,64,8,2 \
  --json "$R/gate_parts.json" > "$R/gate_parts.log" 2>&1
step gate-parts $?; cat "$R/gate_parts.log"
timeout 120 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/gate_precision.json" \
  > "$R/gate_precision.log" 2>&1
step gate-precision $?; cat "$R/gate_precision.log"
timeout 330 python3 -m benchmarks.prefill --seqlens 131072,32768 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=" "$R/prefill.log" | head -30
finish
