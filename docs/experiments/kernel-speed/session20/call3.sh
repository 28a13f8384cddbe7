#!/usr/bin/env bash
# Session 20, call 3 (same tree as call 2, the machine still warm; the testbed's weights in the tree, its unused gate
# sets left out to fit the carry): the README's quickstart on the GPU (quality: session 17's numbers were dense
# 32.02913, seer@0.2 34.63930, passkey 1.00 / 1.00, density 0.204, recall 0.72179).
. benchmarks/session.sh s20c3
timeout -k 10 150 python3 -m seerattn quickstart --device cuda --output "$R/qs" > "$R/quickstart.log" 2>&1
step quickstart $?; grep -A8 "^seerattn quickstart" "$R/quickstart.log"; cat "$R/qs/quickstart.json" 2>/dev/null | head -c 1500
finish
