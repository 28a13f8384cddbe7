#!/usr/bin/env bash
# Session 22, call 4 (on the device, repo root; carry .gpu/base = `git archive 62919c6 src`): the time to first token
# at 128k (per-query-head masks, block 64, 0.1) on this tree (the tuner may pick the union kernel) and on 62919c6, in
# one call, the tuner's choices logged.
. benchmarks/session.sh call4
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }  # after each step: a call cut at its limit still returns
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
run() {  # run TREE_SRC NAME
  PYTHONPATH=$1:. timeout -k 10 230 python3 -c "
import logging, sys
logging.basicConfig(level=logging.WARNING)
logging.getLogger('seerattn.ops._triton.config').setLevel(logging.INFO)
from benchmarks.prefill import main
sys.exit(main(['--seqlens', '131072', '--densities', '0.1', '--warmup', '1', '--reps', '2', '--json', '$R/$2.json']))
" > "$R/$2.log" 2>&1
}
run src prefill128k_new; step new $?; grep -E "^T=" "$R/prefill128k_new.log" | cut -c1-260; save
run .gpu/base/src prefill128k_base; step base $?; grep -E "^T=" "$R/prefill128k_base.log" | cut -c1-260; save
finish
