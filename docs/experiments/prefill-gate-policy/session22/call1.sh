#!/usr/bin/env bash
# Session 22, call 1 (on the device, repo root): the pooling program order and the pre-split projection probes
# (gate_variants.py) at 32k and 128k, Llama-3.1-8B heads, the testbed's gate.
. benchmarks/session.sh call1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$R/gpu.txt"
git log -1 --format=%H > "$R/commit.txt" 2>/dev/null || true
timeout 480 python3 docs/experiments/prefill-gate-policy/session22/gate_variants.py --json "$R/gate_variants.json" \
  > "$R/gate_variants.log" 2>&1
step gate_variants $?
finish
