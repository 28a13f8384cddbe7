#!/usr/bin/env bash
# Session 21, call 2 (the working tree: the Hopper forward takes varlen; .gpu/base = 51da279's src): GPU tests of the
# warp-specialised forward and of varlen; a batch-broadcast K / V (stride 0) on it; every forward candidate on four
# packed prompts; the padded-batch prefill row (4 prompts, 8 layers) on both trees.
# Device call: carry .gpu/base.
. benchmarks/session.sh s21c2
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }  # after each step: a call cut at its limit still returns
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py \
  -k "hopper_ws or varlen or every_sparse_config" > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 8 "$R/gpu_tests.log" | cut -c1-300; save
PYTHONPATH=src:.:tests timeout -k 10 60 python3 docs/experiments/kernel-speed/session21/stride0.py > "$R/stride0.log" 2>&1
step stride0 $?; tail -n 3 "$R/stride0.log" | cut -c1-600; save
timeout -k 10 150 python3 docs/experiments/kernel-speed/session21/varlen.py --json "$R/varlen.json" > "$R/varlen.log" 2>&1
step varlen $?; grep "^{" "$R/varlen.log" | cut -c1-150; save
i=0
for tree in base new base new; do
  i=$((i + 1)); P=src:.; [ $tree != new ] && P=.gpu/$tree/src:.
  PYTHONPATH=$P timeout -k 10 100 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --batch 4 --pad left \
    --layers 8 --warmup 1 --reps 2 --json "$R/prefill_padded_${tree}_$i.json" > "$R/prefill_padded_${tree}_$i.log" 2>&1
  step prefill-padded-$tree-$i $?; grep -E "^T=" "$R/prefill_padded_${tree}_$i.log" | tail -n 4 | cut -c1-200; save
done
finish
