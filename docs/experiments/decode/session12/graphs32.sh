#!/usr/bin/env bash
# One H200 call (issue 17): the GPU tests of the captured step (cuda_graphs None by default), then generate at the
# issue's shape (32 layers of a Llama-3.1-8B-shaped model, batch 16, 32k prompt, the dense prefill in 4096-token
# chunks as in session 10) with NEW new tokens: sparse decode replayed from a CUDA graph, eager, and dense decode
# replayed. Run from the repo root with $OUT set, testbed weights hidden (benchmarks/fa4_payload.sh hide).
NEW=${NEW:-256}
. benchmarks/session.sh graphs32
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_hf_graphs.py tests/test_hf_decode.py \
  > "$R/gpu_tests.log" 2>&1
step gpu-tests $?
tail -3 "$R/gpu_tests.log"
timeout 440 python3 -m benchmarks.generate --new "$NEW" --prefill-chunk 4096 --warmup-prompt 8192 \
  --configs decode-graph,decode,dense-graph --json "$R/generate.json" > "$R/generate.log" 2>&1
step generate $?
grep -v INFO "$R/generate.log" | tail -6
finish
