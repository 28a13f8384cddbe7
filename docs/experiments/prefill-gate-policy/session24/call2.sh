#!/usr/bin/env bash
# Session 24, call 2 (on the device, repo root; carry .gpu/base = `git archive 98f8a32 src benchmarks`, main before
# the change): the density selection's search counting in 10-bit lanes of an int32 (rows up to 512 wide) against
# 98f8a32's int64 lanes, two alternating rounds of the replayed parts; then the time to first token at 32k with fresh
# and with local (banded) gates, the kernel tuner's log, and a per-kernel profile of one 32k forward.
. benchmarks/session.sh call2
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
for round in 1 2; do
  timeout -k 10 70 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts select,gate \
    --json "$R/new$round.json" > "$R/new$round.log" 2>&1
  step new$round $?; cut -c1-120 "$R/new$round.log"; save
  (cd .gpu/base && PYTHONPATH=src:. timeout -k 10 70 python3 -m benchmarks.gate_parts --seqlens 32768,131072 \
    --parts select,gate --json "../../$R/base$round.json") > "$R/base$round.log" 2>&1
  step base$round $?; cut -c1-120 "$R/base$round.log"; save
done
prefill() {  # NAME LIMIT ARGS...: benchmarks.prefill with the kernel tuner's choices logged
  local name=$1 limit=$2; shift 2
  timeout -k 10 "$limit" python3 -c "import logging, runpy, sys
logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
logging.getLogger('seerattn.ops._triton.config').setLevel(logging.INFO)
sys.argv = ['benchmarks.prefill'] + sys.argv[1:]
runpy.run_module('benchmarks.prefill', run_name='__main__')" "$@" --json "$R/$name.json" > "$R/$name.log" 2>&1
}
prefill fresh32k 120 --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 --profile 30
step fresh32k $?; grep -E "^T=" "$R/fresh32k.log" | cut -c1-300; save
prefill local32k 100 --seqlens 32768 --densities 0.1 --warmup 1 --reps 2 --gate-init local
step local32k $?; grep -E "^T=" "$R/local32k.log" | cut -c1-300; grep -c tuned "$R/local32k.log"; save
prefill local128k 170 --seqlens 131072 --densities 0.1 --warmup 1 --reps 2 --gate-init local
step local128k $?; grep -E "^T=" "$R/local128k.log" | cut -c1-300; save
finish
