#!/usr/bin/env bash
# Session 21, call 3 (the working tree: per-query-head masks at 128-token blocks on the Hopper kernel's per-group tile,
# one head a tile; varlen from call 2): GPU tests of the warp-specialised forward, varlen and the tuner's candidates;
# every candidate on per-query-head 128-token masks (32 / 8 and 32 / 32 heads); ours against FlexAttention on them in
# one process; the time to first token at 32k (per-query-head masks, block 64: the path of call 2's kernel).
. benchmarks/session.sh s21c3
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }  # after each step: a call cut at its limit still returns
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 300 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py \
  -k "hopper_ws or varlen or every_sparse_config" > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 8 "$R/gpu_tests.log" | cut -c1-300; save
timeout -k 10 120 python3 docs/experiments/kernel-speed/session21/heads128.py --json "$R/heads128.json" \
  > "$R/heads128.log" 2>&1
step heads128 $?; grep "^{" "$R/heads128.log" | cut -c1-150; save
timeout -k 10 90 python3 -m benchmarks.attention --rep 30 --seqlens 32768 --densities 0.1 --block-sizes 128 \
  --mask-heads hq --providers ours,flex --json "$R/attn_hq128.json" > "$R/attn_hq128.log" 2>&1
step attn-hq128 $?; grep -E "^llama" "$R/attn_hq128.log" | cut -c1-150; save
timeout -k 10 100 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=" "$R/prefill.log" | cut -c1-260; save
finish
