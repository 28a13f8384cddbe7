#!/usr/bin/env bash
# One H200 call: the testbed's decode gates distilled by the recipe (recipes/testbed-decode-gates.yaml, 400 steps) on
# a retrieval-mixed corpus of 50 train books instead of 20 (`python testbed/train.py distill-corpus --n-books 50 --out
# .gpu/dmix/decode_mix50.txt.xz`, carried), then evaluated as the committed gates were: the corpus' 22 test books
# (.gpu/books-test), context 8192, budget 1/8, passkey by generation and decode PPL, dense and seer.
# Run from the repo root with $OUT set (< 9 minutes).
. benchmarks/session.sh retrain50
DATA=${DATA:-.gpu/books-test}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 330 python3 -m seerattn distill recipes/testbed-decode-gates.yaml \
  --set "data=[.gpu/dmix/decode_mix50.txt.xz]" 'document_separator="\x00"' output_dir=$R/dgates50 save_every=1000 \
  progress=false > "$R/distill.log" 2>&1
step distill $?
timeout 170 python3 -m seerattn eval decode --model testbed/model --gates $R/dgates50/adapter --data "$DATA" \
  --context 8192 --budget-fraction 0.125 --samples 32 --tail 2048 --passkey-samples 24 --no-progress \
  --methods dense,seer --output "$R/eval50" > "$R/eval50.log" 2>&1
step eval $?
rm -rf "$R"/dgates50/checkpoints "$R"/dgates50/data_cache  # the adapter and the metrics come back
finish
