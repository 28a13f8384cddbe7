#!/usr/bin/env bash
# Session 16, device call 1 (issue 16, the gate at 32k): the gate kernels' GPU tests with the new pooling kernel,
# every part of the gate and policy timed alone at several tiles (benchmarks.gate_parts), and the previous tree's
# pooling and whole gate timed the same way from an archive of its src in .gpu/main_src (carried).
. benchmarks/session.sh s16c1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gate_kernels.py > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
timeout 300 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --pool-tiles 64,4 128,4 256,8 64,8 32,4 \
  --proj-tiles 64,32,4,3 128,64,8,2 64,64,4,3 128,16,8,4 --json "$R/gate_parts.json" > "$R/gate_parts.log" 2>&1
step gate-parts $?; cat "$R/gate_parts.log"
timeout 120 env PYTHONPATH=.gpu/main_src/src:. python3 - > "$R/gate_main.log" 2>&1 <<'PY'
import torch, seerattn
from seerattn.ops._triton import gate_fwd
from benchmarks.gate_parts import CFG, case
from benchmarks.decode import time_ms
print("seerattn from", seerattn.__file__)
for t in (32768, 131072):
    gate, q, k, cos, sin = case(t, 32, 8)
    for name, fn in (("pool_q", lambda: gate_fwd._pool(q, 16, CFG.q_pooling)),
                     ("pool_k", lambda: gate_fwd._pool(k, 64, CFG.k_pooling))):
        print(f"T={t:>7} main {name:<8} {time_ms(fn, True, 100):8.4f} ms", flush=True)
    with torch.no_grad():
        print(f"T={t:>7} main gate     {time_ms(lambda: gate(q, k, cos, sin, impl='triton'), True, 100):8.4f} ms", flush=True)
PY
step gate-main $?; cat "$R/gate_main.log"
finish
