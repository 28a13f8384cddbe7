#!/usr/bin/env bash
# Session 18, call 5: the Gluon spike's block-sparse variant (per-group masks, block 64, two math warpgroups + TMA
# loader warp walking the list): error against seerattn's Triton kernel and the fp32 reference, then time beside
# it, FlexAttention and FA4 on the same masks in one process (32k; 128k at 10 %).
# Device calls: carry .gpu/fa4a (command `ls .gpu/fa4a`), then at once carry .gpu/fa4b and run this.
. benchmarks/session.sh s18c5
. benchmarks/fa4_payload.sh install
step fa4-install $?
G=docs/experiments/kernel-speed/session18/gluon_fa.py
timeout -k 10 100 python3 "$G" sparse-check 4096 0.1,0.3,1.0 > "$R/check4k.log" 2>&1
step check4k $?; tail -n 4 "$R/check4k.log"
timeout -k 10 100 python3 "$G" sparse-check 32768 0.1 > "$R/check32k.log" 2>&1
step check32k $?; tail -n 2 "$R/check32k.log"
timeout -k 10 200 python3 "$G" sparse-bench 32768 0.1,0.05,1.0 > "$R/bench32k.log" 2>&1
step bench32k $?; grep " ms=" "$R/bench32k.log"
timeout -k 10 120 python3 "$G" sparse-bench 131072 0.1 > "$R/bench128k.log" 2>&1
step bench128k $?; grep " ms=" "$R/bench128k.log"
finish
