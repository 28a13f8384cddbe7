#!/usr/bin/env bash
# Session 24, call 5 (on the device, repo root = 19e7544, the machine still warm from call 4): the README quickstart on
# the GPU with the final tree (against dense 32.02913, seer@0.2 34.63930 of sessions 16-24).
. benchmarks/session.sh call5; timeout -k 10 110 python3 -m seerattn quickstart --device cuda --output "$R/qs" > "$R/quickstart.log" 2>&1; step quickstart $?; grep -A6 "^seerattn quickstart" "$R/quickstart.log"; grep "ppl seer\|ppl dense" "$R/quickstart.log"; rm -f "$R/qs/gate_vs_truth.png"; finish
