#!/usr/bin/env bash
# Session 19, call 2 (same tree as call 1, the machine still warm: FA4 from call 1's .gpu/fa4site): the README's
# quickstart on the GPU (quality with the Hopper tiles the prefill now tunes to: session 17's numbers were dense
# 32.02913, seer@0.2 34.63930, passkey 1.00 / 1.00, density 0.204, recall 0.72179), then per-group masks at 128k
# (blocks 64 and 128, 10 %) with FA4 and Flex in one process.
. benchmarks/session.sh s19c2
. benchmarks/fa4_payload.sh env
timeout -k 10 150 python3 -m seerattn quickstart --device cuda --output "$R/qs" > "$R/quickstart.log" 2>&1
step quickstart $?; grep -A8 "^seerattn quickstart" "$R/quickstart.log"; cat "$R/qs/quickstart.json" 2>/dev/null | head -c 1500
timeout -k 10 170 python3 -m benchmarks.attention --rep 30 --seqlens 131072 --densities 0.1 --block-sizes 64,128 \
  --mask-heads hkv --providers ours,flex,fa4 --sweep --json "$R/sweep128k.json" > "$R/sweep128k.log" 2>&1
step sweep128k $?; grep -E "^llama" "$R/sweep128k.log" | cut -c1-120
finish
