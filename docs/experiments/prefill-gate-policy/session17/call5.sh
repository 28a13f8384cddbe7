#!/usr/bin/env bash
# Session 17, device call 5: the paper's gate (GateConfig(): R = 1, Q pooled avg over whole blocks, no Q projection),
# whose scores tile was never timed: the offline compile (benchmarks/sm90.py) shows the default (64, 64, 4, 2)
# spilling at R = 1 (224 bytes) where (64, 64, 8, 2) and (32, 64, 4, 2) do not.
. benchmarks/session.sh s17c5
TILES="64,64,8,2 32,64,4,2 128,64,8,2 64,128,8,2 32,128,4,2 64,32,4,2 128,32,8,2"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 200 python3 -m benchmarks.gate_parts --gate paper --seqlens 32768,131072 --parts pool,scores,gate \
  --scores-tiles $TILES --json "$R/paper_parts.json" > "$R/paper_parts.log" 2>&1
step paper-parts $?; grep -E "pool_pair|scores|gate " "$R/paper_parts.log"
finish
