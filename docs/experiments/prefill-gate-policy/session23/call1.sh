#!/usr/bin/env bash
# Session 23, call 1 (on the device, repo root; carry .gpu/base = `git archive c66d083 src benchmarks
# docs/experiments/prefill-gate-policy/gate_precision.py`): the split projection (fp16 halves of scaled pooled rows and
# weights, three fp16 products) against c66d083's (32-row mma.sync tile, tl.dot's tf32x3), in one call: the GPU gate
# tests, each part of the gate alone (new: projection tiles), the whole gate's time and error against the fp64 gate.
. benchmarks/session.sh call1
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 150 python3 -m pytest -q -m gpu tests/test_gate_kernels.py > "$R/gpu_gate_tests.log" 2>&1
step gate_tests $?; tail -3 "$R/gpu_gate_tests.log"; save
TILES="64,32,4,3 64,32,8,3 64,64,8,2 64,16,4,4 64,16,8,4 128,32,8,3 128,64,8,2 32,32,4,3 32,64,4,2"
timeout -k 10 150 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts pool,proj,gate --proj-tiles $TILES \
  --json "$R/parts_new.json" > "$R/parts_new.log" 2>&1
step parts_new $?; grep -v "^$" "$R/parts_new.log" | cut -c1-120; save
(cd .gpu/base && PYTHONPATH=src:. timeout -k 10 100 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
  --parts pool,proj,gate --json "../../$R/parts_base.json") > "$R/parts_base.log" 2>&1
step parts_base $?; cut -c1-120 "$R/parts_base.log"; save
timeout -k 10 100 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/precision_new.json" \
  > "$R/precision_new.log" 2>&1
step precision_new $?; tail -12 "$R/precision_new.log"; save
(cd .gpu/base && PYTHONPATH=src:. timeout -k 10 100 python3 docs/experiments/prefill-gate-policy/gate_precision.py \
  --json "../../$R/precision_base.json") > "$R/precision_base.log" 2>&1
step precision_base $?; tail -12 "$R/precision_base.log"; save
timeout -k 10 60 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts pool,proj,gate \
  --json "$R/parts_new2.json" > "$R/parts_new2.log" 2>&1
step parts_new2 $?; cut -c1-120 "$R/parts_new2.log"; save
finish
