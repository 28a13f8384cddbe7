#!/usr/bin/env bash
# Session 18, call 4: the Gluon spike's two-warpgroup kernel (ws2) refined: with / without look-ahead scores, with /
# without explicit turn-taking between the warpgroups (mbarriers), 4 or 5 stages; errors against SDPA's flash kernel
# (4k, 32k), then every run beside SDPA FA2, cuDNN and seerattn's Triton dense forward at 32k, and the main ones at
# 128k, one process each (Llama-3.1-8B heads, bf16).
. benchmarks/session.sh s18c4
G=docs/experiments/kernel-speed/session18/gluon_fa.py
WS2=ws2-n64-s4-look,ws2-n64-s4,ws2-n64-s4-look-pp,ws2-n64-s4-pp,ws2-n64-s5-look,ws2-n64-s5-look-pp
timeout -k 10 120 python3 "$G" check "$WS2" > "$R/check.log" 2>&1
step check $?; tail -n 12 "$R/check.log"
timeout -k 10 150 python3 "$G" bench "plain-n64-s3,ws-n64-s4,$WS2" 32768 > "$R/bench32k.log" 2>&1
step bench32k $?; tail -n 12 "$R/bench32k.log"
timeout -k 10 150 python3 "$G" bench "plain-n64-s3,ws2-n64-s4-look,ws2-n64-s4-look-pp,ws2-n64-s5-look" 131072 \
  > "$R/bench128k.log" 2>&1
step bench128k $?; tail -n 8 "$R/bench128k.log"
finish
