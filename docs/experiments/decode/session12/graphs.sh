#!/usr/bin/env bash
# One H200 call (issue 17): decode steps replayed from a CUDA graph (SeerState.cuda_graphs, seerattn/hf/graphs.py).
# 1. the GPU tests of the captured step and of the eager decode path (replayed == eager generate, token for token);
# 2. generate of a Llama-3.1-8B-shaped model cut to LAYERS layers, batch 16, 32k prompt + NEW tokens, CONFIGS in
#    that order (eager vs replayed steps, dense / sparse decode / sparse prefill + sparse decode), EXTRA arguments.
# Run from the repo root with $OUT set, testbed weights hidden (benchmarks/fa4_payload.sh hide). Session 12's runs:
#   bash graphs.sh                                                      (16 layers, the order check of session 11)
#   LAYERS=32 NEW=256 EXTRA="--prefill-chunk 4096" CONFIGS=decode-graph,decode,dense-graph bash graphs.sh
#     (the 32 layers: a one-shot 16 x 32k prompt does not fit, so the dense prompt runs in chunks)
LAYERS=${LAYERS:-16}
NEW=${NEW:-512}
CONFIGS=${CONFIGS:-decode-graph,both-graph,both,decode,dense-graph}
EXTRA=${EXTRA:-}
. benchmarks/session.sh "graphs$LAYERS"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_hf_graphs.py tests/test_hf_decode.py \
  > "$R/gpu_tests.log" 2>&1
step gpu-tests $?
tail -3 "$R/gpu_tests.log"
# shellcheck disable=SC2086  # EXTRA is a list of arguments
timeout 420 python3 -m benchmarks.generate --layers "$LAYERS" --new "$NEW" --warmup-prompt 8192 $EXTRA \
  --configs "$CONFIGS" --json "$R/generate.json" > "$R/generate.log" 2>&1
step generate $?
grep -v INFO "$R/generate.log" | tail -8
finish
