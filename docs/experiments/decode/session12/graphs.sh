#!/usr/bin/env bash
# One H200 call (issue 17): decode steps replayed from a CUDA graph (SeerState.cuda_graphs, seerattn/hf/graphs.py).
# 1. the GPU tests of the captured step and of the eager decode path (replayed == eager generate, token for token);
# 2. generate of a Llama-3.1-8B-shaped model, 16 layers, batch 16, 32k prompt + NEW tokens: eager vs replayed steps,
#    dense / sparse decode / sparse prefill + sparse decode, and the order check of session 11 ('both' before
#    'decode', eager). Run from the repo root with $OUT set, testbed weights hidden (benchmarks/fa4_payload.sh hide).
NEW=${NEW:-512}
. benchmarks/session.sh graphs12
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_hf_graphs.py tests/test_hf_decode.py \
  > "$R/gpu_tests.log" 2>&1
step gpu-tests $?
tail -5 "$R/gpu_tests.log"
timeout 400 python3 -m benchmarks.generate --layers 16 --new "$NEW" --warmup-prompt 8192 \
  --configs decode-graph,both-graph,both,decode,dense-graph --json "$R/generate.json" > "$R/generate.log" 2>&1
step generate $?
grep -v INFO "$R/generate.log" | tail -8
finish
