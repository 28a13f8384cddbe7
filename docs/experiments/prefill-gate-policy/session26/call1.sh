#!/usr/bin/env bash
# Session 26, call 1 (on the device, repo root = wip/select-vec: vector loads / padding stores in the selection, the
# gate's causal_only logits; carry .gpu/base = `git archive 71285e8 src benchmarks`, .gpu/tm = `git archive
# wip/tune-masks src benchmarks tests pyproject.toml`): the selection and scores A/B against main (two alternating
# rounds, outputs hashed), the branch's GPU tests, then the tuner candidate: its GPU tests and 128k@0.05 on 8 layers,
# twice on main and twice on the candidate, alternating (picks and times in each row's "tuning").
. benchmarks/session.sh call1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
AB=docs/experiments/prefill-gate-policy/session26/select_ab.py
for i in 1 2; do
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 10 100 python3 "../../$AB" --tag base$i --json "../../$R/base$i.json") \
    > "$R/base$i.log" 2>&1
  step base$i $?
  timeout -k 10 100 python3 $AB --tag new$i --json "$R/new$i.json" > "$R/new$i.log" 2>&1
  step new$i $?
done
grep -h '"part"' "$R"/base1.log "$R"/new1.log "$R"/base2.log "$R"/new2.log | cut -c1-160
timeout -k 10 200 python3 -m pytest -q -m gpu tests/test_select_kernels.py tests/test_gate_kernels.py \
  tests/test_gpu_kernels.py -k "policies or bf16_32k or host_sync" -p no:cacheprovider > "$R/gpu_tests.log" 2>&1
step gpu_tests $?; tail -2 "$R/gpu_tests.log"
(cd .gpu/tm && PYTHONPATH=src:. timeout -k 10 150 python3 -m pytest -q -m gpu tests/test_gpu_kernels.py \
  tests/test_gate_kernels.py tests/test_decode_ops.py tests/test_kernel_tuning.py -k "host_sync or tun" \
  -p no:cacheprovider) > "$R/tm_gpu_tests.log" 2>&1
step tm_gpu_tests $?; tail -2 "$R/tm_gpu_tests.log"
for i in 1 2; do
  for tree in base tm; do
    (cd .gpu/$tree && PYTHONPATH=src:. timeout -k 10 120 python3 -m benchmarks.prefill --seqlens 131072 \
      --densities 0.05 --layers 8 --warmup 0 --reps 1 --json "../../$R/pick_${tree}$i.json") \
      > "$R/pick_${tree}$i.log" 2>&1
    step pick_${tree}$i $?; grep -E "^T=" "$R/pick_${tree}$i.log" | cut -c1-200
  done
done
finish
