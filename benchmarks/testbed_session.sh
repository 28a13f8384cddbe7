#!/usr/bin/env bash
# One GPU call: distil the testbed's gates, evaluate every method at 8k (PPL, passkey, mask recall),
# and measure distillation throughput on a Llama-3.1-8B-shaped model at 32k.
# Env: DATA (distillation corpus, default .gpu/distill.txt.xz), STEPS, METHODS, SKIP_TPUT=1,
# GATES=adapter-folder (evaluate these gates; no distillation), ALLOCATIONS (density allocations,
# comma-separated from seerattn.block_mask.ALLOCATIONS; default row).
# Needs .gpu/distill.txt.xz (train books joined by NUL, xz) and .gpu/books (test books + MANIFEST.tsv)
# carried along. Everything lands in $OUT/session.tgz; a summary is printed last.
. benchmarks/gpu_run_env.sh session
if [ -z "${GATES:-}" ]; then
  timeout 200 python3 -m seerattn distill recipes/testbed.yaml --set model=testbed/model tokenizer=testbed/model \
    "data=[${DATA:-.gpu/distill.txt.xz}]" 'document_separator="\x00"' steps=${STEPS:-150} save_every=30 \
    output_dir=$R/gates > $R/distill.log 2>&1; echo "distill rc=$? $(( $(date +%s)-S ))s"
fi
G=${GATES:-$R/gates/adapter}
E="--model testbed/model --gates $G --data .gpu/books --no-progress --allocations ${ALLOCATIONS:-row}"
M=${METHODS:-dense,seer,oracle,streaming,vertical_slash,random}
timeout 300 python3 -m seerattn eval ppl $E --contexts 8192 --samples 16 --methods $M --densities 0.5,0.2,0.1 \
  -o $R/ppl > $R/ppl.log 2>&1; echo "ppl rc=$? $(( $(date +%s)-S ))s"
timeout 90 python3 -m seerattn eval masks $E --context 8192 --methods $M --densities 0.1 \
  -o $R/masks > $R/masks.log 2>&1; echo "masks rc=$? $(( $(date +%s)-S ))s"
timeout 300 python3 -m seerattn eval passkey $E --contexts 2048,4096,8192 --samples 4 --methods $M \
  --densities 0.5,0.2,0.1 -o $R/passkey > $R/passkey.log 2>&1; echo "passkey rc=$? $(( $(date +%s)-S ))s"
[ -n "${SKIP_TPUT:-}" ] || timeout 110 python3 -m benchmarks.distill_throughput --seq-len 32768 --steps 4 --data .gpu/distill.txt.xz \
  --tokenizer testbed/model --output $R/tput > $R/tput.log 2>&1; echo "tput rc=$? $(( $(date +%s)-S ))s"
# the 8B-shaped model's random gates (200 MB) and the checkpoints stay behind
rm -rf $R/gates/data_cache $R/gates/checkpoints $R/tput/data_cache $R/tput/checkpoints $R/tput/adapter
tar czf $OUT/session.tgz $R
for f in $R/ppl/ppl.md $R/masks/masks.md $R/passkey/passkey.md; do [ -f $f ] && cat $f; done
for f in $R/distill.log $R/tput.log; do [ -f $f ] && tail -3 $f; done
grep -h tokens_per_s $R/tput/throughput.json 2>/dev/null | head -3
