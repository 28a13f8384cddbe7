#!/usr/bin/env bash
# Session 23, call 3 (on the device, repo root; carry .gpu/base = `git archive c66d083 src benchmarks ...`): the time
# to first token with the split projection, 32k on this tree and on c66d083 (alternating), 128k on this tree; the
# per-part breakdown (gate, policy, kernel) is the benchmark's own.
. benchmarks/session.sh call3
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
run() {  # run TREE NAME SEQLEN LIMIT
  (cd "$1" && PYTHONPATH=src:. timeout -k 10 "$4" python3 -m benchmarks.prefill --seqlens "$3" --densities 0.1 \
    --warmup 1 --reps 2 --json "$OLDPWD/$R/$2.json") > "$R/$2.log" 2>&1
}
run . new32k 32768 150; step new32k $?; grep -E "^T=" "$R/new32k.log" | cut -c1-300; save
run .gpu/base base32k 32768 150; step base32k $?; grep -E "^T=" "$R/base32k.log" | cut -c1-300; save
run . new128k 131072 240; step new128k $?; grep -E "^T=" "$R/new128k.log" | cut -c1-300; save
finish
