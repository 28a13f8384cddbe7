#!/usr/bin/env bash
# One H200 call for the gate and policy kernels (issue 16): the Q/K projections with RoPE fused and the density
# selection by width class, candidates until session 10, which ran this script (4.2 min; results under
# docs/experiments/prefill-gate-policy/session10) and merged both. Run from the repo root with $OUT set:
#   1. GPU correctness: the fused gate vs the eager gate (bf16, 32k), the selection kernels vs the PyTorch
#      policies, the policies on CUDA vs CPU;
#   2. the selection alone, the pre-session-10 kernel (a copy) against today's, outputs asserted equal first
#      (select_bench.py --sweep);
#   3. the gate alone: time, error against fp64 and the (head, row) pairs whose selection differs from the eager
#      fp32 gate (gate_precision.py; session 8's numbers for main's gate are on the prefill-gate-policy page);
#   4. time to first token at 32k and 128k, densities 0.1 and 0.05, with the per-part breakdown.
# Planned for < 9 minutes (each step has its own timeout; every step prints as it goes).
# DRY=1: on the CPU (Triton interpreter, tiny shapes) the same steps' smoke versions.
. benchmarks/session.sh candidates_session
D=docs/experiments/prefill-gate-policy
if [ -n "${DRY:-}" ]; then
  export TRITON_INTERPRET=1
  TESTS=(-m "not gpu" tests/test_gate_kernels.py tests/test_select_kernels.py)
  PREFILL="--smoke --seqlens 150 --layers 1 --block-sizes 32 --densities 0.1"
  T_TESTS=400; T_SELECT=1; T_GATE=1; T_PREFILL=300
else
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
  TESTS=(-m gpu tests/test_gate_kernels.py tests/test_select_kernels.py tests/test_policies.py)
  PREFILL="--seqlens 32768,131072 --densities 0.1,0.05 --warmup 1 --reps 2"
  T_TESTS=${T_TESTS:-150}; T_SELECT=${T_SELECT:-90}; T_GATE=${T_GATE:-90}; T_PREFILL=${T_PREFILL:-200}
fi
git rev-parse HEAD > "$R/commit.txt" 2>/dev/null

timeout $T_TESTS python3 -m pytest -q "${TESTS[@]}" > "$R/tests.log" 2>&1; step tests $?
if [ -z "${DRY:-}" ]; then
  timeout $T_SELECT python3 $D/select_bench.py --sweep --json "$R/select_bench.json" > "$R/select_bench.log" 2>&1
  step select_bench $?
  timeout $T_GATE python3 $D/gate_precision.py --json "$R/gate_precision.json" > "$R/gate_precision.log" 2>&1
  step gate_precision $?
fi
timeout $T_PREFILL python3 -m benchmarks.prefill $PREFILL --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?

{
  echo "# candidates session ($(cat "$R/gpu.txt" 2>/dev/null || echo "dry run, CPU interpreter"), commit $(cat "$R/commit.txt"))"
  echo; echo '```'; cat "$R/steps.txt"; echo '```'
  for f in tests select_bench gate_precision prefill; do
    [ -f "$R/$f.log" ] && { echo; echo "## $f"; echo; echo '```'; tail -30 "$R/$f.log"; echo '```'; }
  done
} > "$OUT/summary.md"
finish
