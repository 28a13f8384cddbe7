#!/usr/bin/env bash
# One H200 call for issue 16, first half (fused gate, selection kernel, order-free tuning), run from the
# repo root with $OUT set:
#   1. GPU correctness (pytest -m gpu): the fused gate vs the eager gate on bf16 at 32k, the selection
#      kernel vs the PyTorch policies at 32k, the policy masks on CUDA vs CPU for both impls, and no host
#      sync in a sparse layer (fused gate + selection kernel + kernel; policies + kernel);
#   2. time to first token of the Llama-3.1-8B-shaped model at 32k and 128k, densities 0.1 and 0.05,
#      with the per-part breakdown (gate, policy, kernel, rest), after (--gate-impls triton: the fused
#      gate and the selection kernel) and before (eager: the PyTorch gate and policies) in one run.
# Planned for < 6 minutes on one H200 (each step has its own timeout).
# DRY=1: on the CPU (Triton interpreter, tiny shapes): the interpreter tests of the same kernels, and the
# prefill benchmark's smoke model with both gate impls. Files under $OUT: summary.md,
# prefill_session.tgz (records and logs), prefill.json.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src:.
OUT=${OUT:?set OUT to the folder whose files come back}
R=runs/prefill_session
rm -rf "$R"
mkdir -p "$R" "$OUT"
S=$(date +%s)
step() { echo "$1 rc=$2 $(( $(date +%s) - S ))s" | tee -a "$R/steps.txt"; }
# benchmarks.prefill with the interpreter's NumPy work-around applied first (tests/kernel_helpers.py)
PREFILL_PY="import sys; sys.path.insert(0, 'tests')
import os
if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
    from kernel_helpers import patch_interpreter_index; patch_interpreter_index()
from benchmarks import prefill; raise SystemExit(prefill.main(sys.argv[1:]))"
if [ -n "${DRY:-}" ]; then
  export TRITON_INTERPRET=1
  TESTS=(-m "not gpu" tests/test_gate_kernels.py tests/test_select_kernels.py tests/test_kernel_tuning.py)
  PREFILL="--smoke --seqlens 150 --layers 1 --block-sizes 32 --densities 0.1,0.05"
  T_TESTS=300; T_PREFILL=300
else
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
  TESTS=(-m gpu tests/test_gate_kernels.py tests/test_select_kernels.py tests/test_policies.py
         tests/test_gpu_kernels.py::test_sparse_layer_path_has_no_host_sync)
  PREFILL="--seqlens 32768,131072 --densities 0.1,0.05 --warmup 1 --reps 2"
  T_TESTS=120; T_PREFILL=225
fi
git rev-parse HEAD > "$R/commit.txt" 2>/dev/null

timeout $T_TESTS python3 -m pytest -q "${TESTS[@]}" > "$R/tests.log" 2>&1; step tests $?
timeout $T_PREFILL python3 -c "$PREFILL_PY" $PREFILL --gate-impls triton,eager --json "$R/prefill.json" \
  > "$R/prefill.log" 2>&1; step prefill $?

{
  echo "# prefill session ($(cat "$R/gpu.txt" 2>/dev/null || echo "dry run, CPU interpreter"), commit $(cat "$R/commit.txt"))"
  echo; echo '```'; cat "$R/steps.txt"; echo '```'
  echo; echo "## tests"; echo; echo '```'; tail -25 "$R/tests.log"; echo '```'
  echo; echo "## prefill"; echo; echo '```'; grep -E "^T=|Error|error" "$R/prefill.log" | tail -40; echo '```'
} > "$OUT/summary.md"
tar czf "$OUT/prefill_session.tgz" "$R"
[ -f "$R/prefill.json" ] && cp "$R/prefill.json" "$OUT/"
cat "$R/steps.txt"
