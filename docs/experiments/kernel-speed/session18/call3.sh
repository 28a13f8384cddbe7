#!/usr/bin/env bash
# Session 18, call 3: the Gluon causal forward spike (gluon_fa.py): each variant's error against SDPA's flash kernel
# at 4k and 32k, then its variants (64-key steps with 3 / 4 stages, 128-key steps with 2; scores waited at once,
# look-ahead scores, warp-specialised loader, two independent math warpgroups) beside SDPA FA2, cuDNN and seerattn's Triton dense forward in one
# process at 32k (Llama-3.1-8B heads, bf16).
. benchmarks/session.sh s18c3
G=docs/experiments/kernel-speed/session18/gluon_fa.py
timeout -k 10 150 python3 "$G" check > "$R/check.log" 2>&1
step check $?; tail -n 16 "$R/check.log"
timeout -k 10 200 python3 "$G" bench > "$R/bench.log" 2>&1
step bench $?; tail -n 16 "$R/bench.log"
finish
