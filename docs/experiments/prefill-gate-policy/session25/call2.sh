#!/usr/bin/env bash
# Session 25, call 2 (on the device, repo root = branch wip/qproj-ws): Q's pooling and projection fused in one Gluon
# kernel. Its GPU tests against the two kernels, the gate's error against fp64, the fused Q side against the unfused
# one and the whole gate fused / unfused (replayed) at 32k and 128k.
. benchmarks/session.sh call2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 150 python3 -m pytest -q -m gpu tests/test_gate_kernels.py -p no:cacheprovider -x > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -25 "$R/gpu_tests.log" | cut -c1-300
timeout -k 10 60 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/precision.json" \
  > "$R/precision.log" 2>&1
step precision $?; tail -3 "$R/precision.log" | cut -c1-220
timeout -k 10 120 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts qfused,gate \
  --json "$R/parts.json" > "$R/parts.log" 2>&1
step parts $?; grep -E "T=" "$R/parts.log" | cut -c1-140
finish
