#!/usr/bin/env bash
# session 15, call 6: the GPU tests of the decode files on the final tree (bound_slots the default of DecodeConfig).
. benchmarks/session.sh s15f
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 270 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_decode_ops.py tests/test_hf_graphs.py \
  tests/test_kcache_kernels.py tests/test_gate_query_kernel.py tests/test_decode_distill.py tests/test_hf_decode.py \
  tests/test_decode_select.py > "$R/gpu_tests.log" 2>&1
step gpu-decode-tests $?; grep -E "FAILED|ERROR|passed|failed" "$R/gpu_tests.log" | tail -n 12
finish
