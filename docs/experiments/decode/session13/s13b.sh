#!/usr/bin/env bash
# session 13, call 2: the two failing GPU distillation tests with tracebacks; the gate query eager vs Triton in the
# branch tree, alternated (16 layers, 1024 new); main's 32-layer replayed decode (256 new) against session 12.
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=runs/s13b; rm -rf "$R"; mkdir -p "$R" "$OUT"; ROOT=$PWD
S=$(date +%s); step() { echo "$1 rc=$2 $(( $(date +%s) - S ))s" | tee -a "$R/steps.txt"; }
PYTHONPATH=src:. timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short \
  tests/test_distill.py::test_cuda_bf16_triton_distillation_and_resume \
  tests/test_decode_distill.py::test_cuda_bf16_decode_distillation_and_resume > "$R/distill_tests.log" 2>&1
step distill-tests $?; grep -E "^E |Error|assert|passed|failed" "$R/distill_tests.log" | head -30
for t in eager triton eager triton eager triton; do
  (cd .gpu/gqf && PYTHONPATH=src:. timeout 75 python3 "$ROOT/.gpu/run/gen_impl.py" $t --layers 16 --new 1024 \
    --warmup-prompt 8192 --configs decode-graph --json "$ROOT/$R/ab_$t.$(date +%s).json") > "$R/ab_$t.log" 2>&1
  step "ab-$t" $?; grep "tok/s" "$R/ab_$t.log"
done
PYTHONPATH=src:. timeout 200 python3 -m benchmarks.generate --layers 32 --new 256 --warmup-prompt 8192 \
  --prefill-chunk 4096 --configs decode-graph --json "$R/generate32.json" > "$R/generate32.log" 2>&1
step gen32 $?; grep "tok/s" "$R/generate32.log"
tar czf "$OUT/s13b.tgz" "$R"; cat "$R/steps.txt"
