#!/usr/bin/env bash
# session 13, call 1: main's GPU tests (RotaryTable, lazy density, Triton append), wip/gate-query-fused validated and
# timed against main (16-layer generate main / branch / main), then main's whole GPU suite.
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=$OUT/s13a; mkdir -p "$R"; ROOT=$PWD
S=$(date +%s); step() { echo "$1 rc=$2 $(( $(date +%s) - S ))s" | tee -a "$R/steps.txt"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)" | tee -a "$R/gpu.txt"
PYTHONPATH=src:. timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_hf_graphs.py tests/test_hf_decode.py tests/test_kcache_kernels.py > "$R/main_tests.log" 2>&1
step main-tests $?; tail -n 2 "$R/main_tests.log"
cd .gpu/gqf
PYTHONPATH=src:. timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gate_query_kernel.py tests/test_kcache_kernels.py tests/test_hf_graphs.py tests/test_hf_decode.py > "$R/gqf_tests.log" 2>&1
step gqf-tests $?; tail -n 2 "$R/gqf_tests.log"
PYTHONPATH=src:. timeout 80 python3 -m benchmarks.gate_query --batches 16,64 --json "$R/gate_query.json" > "$R/gate_query.log" 2>&1
step gate-query $?; tail -n 8 "$R/gate_query.log"
PYTHONPATH=src:. timeout 60 python3 -m benchmarks.kcache_append --batches 16,64 --json "$R/kcache_gqf.json" > "$R/kcache_gqf.log" 2>&1
step kcache-gqf $?
cd "$ROOT"
PYTHONPATH=src:. timeout 60 python3 -m benchmarks.kcache_append --batches 16,64 --json "$R/kcache_main.json" > "$R/kcache_main.log" 2>&1
step kcache-main $?
for t in main gqf main2; do
  d=$ROOT; [ "$t" = gqf ] && d=$ROOT/.gpu/gqf
  (cd "$d" && PYTHONPATH=src:. timeout 110 python3 -m benchmarks.generate --layers 16 --new 512 --warmup-prompt 8192 \
    --configs decode-graph --json "$R/gen_$t.json") > "$R/gen_$t.log" 2>&1
  step "gen-$t" $?; grep -v INFO "$R/gen_$t.log" | tail -n 2
done
PYTHONPATH=src:. timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$R/main_all_gpu.log" 2>&1
step main-all-gpu $?; tail -n 3 "$R/main_all_gpu.log"
cat "$R/steps.txt"
