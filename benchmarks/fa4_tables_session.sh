#!/usr/bin/env bash
# One H200 call, the second of a pair that carries FlashAttention-4 (benchmarks/fa4_payload.sh: the first call
# carries .gpu/fa4a, this one .gpu/fa4b): the kernel tables of issue 16's targets with every provider in one run
# (ours, SDPA's FA2 and cuDNN, FlexAttention, FA4; 32k, Llama-3.1-8B heads, bf16) and an 8-layer profile of a 32k
# prefill (the gate's and the policy's kernels against the block-sparse kernel's, for the 32k share target).
# Run from the repo root with $OUT set; every step has its own timeout and prints as it goes (< 8 minutes).
. benchmarks/session.sh fa4_tables_session
. benchmarks/fa4_payload.sh install
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
# per-group masks at blocks 64 and 128 (the FA4 targets), then per-query-head random masks at block 64 (the
# FlexAttention target), each in its own process so that one provider's failure does not hide the others
timeout 170 python3 -m benchmarks.attention --seqlens 32768 --densities 1.0,0.1,0.05 --block-sizes 64,128 \
  --mask-heads hkv --masks structured --providers ours,fa2,cudnn,flex,fa4 --rep 30 \
  --json "$R/attention_hkv.json" > "$R/attention_hkv.log" 2>&1
step attention_hkv $?
timeout 100 python3 -m benchmarks.attention --seqlens 32768 --densities 0.1 --block-sizes 64 --mask-heads hq \
  --masks random,structured --providers ours,flex,fa4 --rep 30 --json "$R/attention_hq.json" > "$R/attention_hq.log" 2>&1
step attention_hq $?
timeout 150 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --layers 8 --warmup 1 --reps 1 --profile 45 \
  --json "$R/profile32k.json" > "$R/profile32k.log" 2>&1
step profile32k $?
finish
