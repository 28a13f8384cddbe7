#!/usr/bin/env bash
# Session 16, device call 3 (issue 16): the gate with the pooling loop unrolled, Q and K jobs in one launch each and
# the scores kernel transposed (key tile x windows, the windows split into TF32 halves once per program); the sparse
# prefill ranking density masks on the logits (no softmax). GPU tests of the gate and the selection, the parts at
# several scores tiles, the previous tree's gate (archive in .gpu/main_src), and the time to first token.
. benchmarks/session.sh s16c3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gate_kernels.py \
  tests/test_select_kernels.py tests/test_policies.py > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
timeout 240 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
  --scores-tiles 64,128,8,2 32,128,8,2 64,64,4,2 64,64,8,2 128,64,8,3 --json "$R/gate_parts.json" > "$R/gate_parts.log" 2>&1
step gate-parts $?; cat "$R/gate_parts.log"
timeout 90 env PYTHONPATH=.gpu/main_src/src:. python3 - > "$R/gate_main.log" 2>&1 <<'PY'
import torch
from benchmarks.gate_parts import case
from benchmarks.decode import time_ms
for t in (32768, 131072):
    gate, q, k, cos, sin = case(t, 32, 8)
    with torch.no_grad():
        print(f"T={t:>7} main gate     {time_ms(lambda: gate(q, k, cos, sin, impl='triton'), True, 100):8.4f} ms", flush=True)
PY
step gate-main $?; cat "$R/gate_main.log"
timeout 330 python3 -m benchmarks.prefill --seqlens 131072,32768 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=|gate|ratio" "$R/prefill.log" | head -30
finish
