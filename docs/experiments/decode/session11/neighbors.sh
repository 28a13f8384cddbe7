#!/usr/bin/env bash
# One H200 call: does ranking decode blocks by their span with a neighbour (DecodePolicy.neighbors) help the
# testbed's passkey-by-generation without costing decode PPL? The corpus' 22 test books (carried as .gpu/books-test:
# the test rows of MANIFEST.tsv and their files), context 8192, budget 1/8, committed testbed/gates-decode, bf16.
# Run from the repo root with $OUT set (each run has its own timeout; < 9 minutes in all).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src:.
OUT=${OUT:?set OUT to the folder whose files come back}
DATA=${DATA:-.gpu/books-test}
R=runs/neighbors
rm -rf "$R"
mkdir -p "$R" "$OUT"
S=$(date +%s)
step() { echo "$1 rc=$2 $(( $(date +%s) - S ))s" | tee -a "$R/steps.txt"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
common=(--model testbed/model --gates testbed/gates-decode --data "$DATA" --context 8192 --budget-fraction 0.125
  --samples 32 --tail 2048 --passkey-samples 24 --no-progress)
timeout 200 python3 -m seerattn eval decode "${common[@]}" --methods dense,seer,quest,streaming --neighbors none \
  --output "$R/none" > "$R/none.log" 2>&1
step none $?
for n in next both; do
  timeout 150 python3 -m seerattn eval decode "${common[@]}" --methods seer --neighbors $n --output "$R/$n" \
    > "$R/$n.log" 2>&1
  step $n $?
done
tar czf "$OUT/neighbors.tgz" "$R"
cat "$R/steps.txt"
