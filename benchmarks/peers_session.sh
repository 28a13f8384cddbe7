#!/usr/bin/env bash
# One H200 call for issue 15 (XAttention and FlexPrefill beside seer), run from the repo root with $OUT set:
#   1. mask-estimation cost per layer, Llama-3.1-8B shapes, 8k / 32k / 128k   (benchmarks.mask_cost)
#   2. time to first token of the 8B-shaped model at 32k, seer vs the peers    (benchmarks.prefill)
#   3. testbed quality (testbed/model + testbed/gates, block 64): PPL at 8k (whole and last 2048 tokens,
#      16 windows), passkey at 2k/4k/8k (12 keys x 5 depths) at densities 0.2 and 0.1 for dense, seer,
#      oracle, streaming, vertical_slash, xattention, flexprefill; the native modes (xattention_top_p,
#      flexprefill_top_p, seer_top_p at 0.9) in PPL and masks only (passkey time); block maps at 8k, 10 %.
# Planned for < 8 minutes on one H200 (each step has its own timeout). Env: PREFILL_SEQLENS (32768; add
# 131072 only with time to spare), TOP_P (0.9), DRY=1 (tiny CPU dry run: smoke benchmarks, 512-token evals).
# Files under $OUT (7): summary.md (every table), peers_session.tgz (all records, tables, plots, logs),
# mask_cost.json, prefill.json, ppl.json, passkey.json, block_maps.png.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src:.
OUT=${OUT:?set OUT to the folder whose files come back}
R=runs/peers_session
rm -rf "$R"
mkdir -p "$R" "$OUT"
S=$(date +%s)
step() { echo "$1 rc=$2 $(( $(date +%s) - S ))s" | tee -a "$R/steps.txt"; }
TOP_P=${TOP_P:-0.9}
PEERS=xattention,xattention_top_p,flexprefill,flexprefill_top_p
DENSE_METHODS=dense,seer,oracle,streaming,vertical_slash,xattention,flexprefill
if [ -n "${DRY:-}" ]; then
  BENCH="--smoke"; PREFILL="--smoke"; DEV="--device cpu --threads 4"
  PPL_CTX="--contexts 512 --samples 1"; PK_CTX="--contexts 512 --samples 1 --depths 0,1"; MASK_CTX="--context 512"
else
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
  BENCH="--seqlens 8192,32768,131072"; PREFILL="--seqlens ${PREFILL_SEQLENS:-32768} --warmup 1 --reps 3"; DEV=""
  PPL_CTX="--contexts 8192 --samples 16"; PK_CTX="--contexts 2048,4096,8192 --samples 12"; MASK_CTX="--context 8192"
fi

timeout 75 python3 -m benchmarks.mask_cost $BENCH --methods seer,$PEERS,vertical_slash --top-p "$TOP_P" \
  --json "$R/mask_cost.json" > "$R/mask_cost.log" 2>&1; step mask_cost $?
timeout 120 python3 -m benchmarks.prefill $PREFILL --methods seer,$PEERS --densities 0.1 --top-p "$TOP_P" \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1; step prefill $?

# the eval data: the CLI's default --data
E="--model testbed/model --gates testbed/gates --no-progress $DEV"
timeout 70 python3 -m seerattn eval ppl $E $PPL_CTX --methods $DENSE_METHODS,seer_top_p,xattention_top_p,flexprefill_top_p \
  --densities 0.2,0.1 --top-p "$TOP_P" -o "$R/ppl" > "$R/ppl.log" 2>&1; step ppl $?
timeout 220 python3 -m seerattn eval passkey $E $PK_CTX --methods $DENSE_METHODS --densities 0.2,0.1 \
  -o "$R/passkey" > "$R/passkey.log" 2>&1; step passkey $?
timeout 45 python3 -m seerattn eval masks $E $MASK_CTX --methods seer,oracle,streaming,vertical_slash,$PEERS \
  --densities 0.1 --top-p "$TOP_P" -o "$R/masks" > "$R/masks.log" 2>&1; step masks $?

{
  echo "# peers session ($(cat "$R/gpu.txt" 2>/dev/null || echo "dry run, CPU"))"
  echo; echo '```'; cat "$R/steps.txt"; echo '```'
  for f in mask_cost prefill; do
    echo; echo "## $f"; echo; echo '```'; grep -E "^T=|Error|error" "$R/$f.log" | tail -60; echo '```'
  done
  for f in ppl/ppl.md passkey/passkey.md masks/masks.md; do
    [ -f "$R/$f" ] && { echo; cat "$R/$f"; } || { echo; echo "## $f missing; log tail:"; tail -5 "$R/${f%%/*}.log"; }
  done
} > "$OUT/summary.md"
tar czf "$OUT/peers_session.tgz" "$R"
for f in mask_cost.json prefill.json ppl/ppl.json passkey/passkey.json masks/block_maps.png; do
  [ -f "$R/$f" ] && cp "$R/$f" "$OUT/"
done
cat "$R/steps.txt"
