#!/usr/bin/env bash
# One GPU call: distil several testbed gate variants that differ in recipe overrides, then score each
# with the evaluation harness (seer gate only: passkey at 2k/4k/8k, 8k perplexity, mask recall).
# Env: VARIANTS ("name:override override;name2:..." recipe --set overrides per variant), STEPS,
# CTX (passkey contexts), PPL_CTX, SAMPLES (passkey samples), PPL_SAMPLES,
# METHODS (evaluated methods, default seer; all run at the variant's block size),
# DATA (corpus, default .gpu/distill_mix.txt.xz), DENS (densities), ALLOCATIONS (density allocations,
# default row). .gpu/books = test books + MANIFEST.tsv.
# Everything lands in $OUT/sweep.tgz (adapters, logs, JSON); a table is printed last.
. benchmarks/gpu_run_env.sh sweep
DENS=${DENS:-0.5,0.2,0.1}
IFS=';' read -ra VS <<< "${VARIANTS:-avg:gate.q_pooling=[avg]}"
for v in "${VS[@]}"; do
  name=${v%%:*}; over=${v#*:}; D=$R/$name
  # shellcheck disable=SC2086
  timeout 240 python3 -m seerattn distill recipes/testbed.yaml --set model=testbed/model tokenizer=testbed/model \
    "data=[${DATA:-.gpu/distill_mix.txt.xz}]" 'document_separator="\x00"' steps=${STEPS:-400} save_every=100000 \
    output_dir=$D $over > $R/$name.distill.log 2>&1; echo "$name distill rc=$? $(( $(date +%s)-S ))s"
  E="--model testbed/model --gates $D/adapter --data .gpu/books --no-progress --methods ${METHODS:-seer} --allocations ${ALLOCATIONS:-row}"
  timeout 150 python3 -m seerattn eval passkey $E --contexts ${CTX:-2048,4096,8192} --samples ${SAMPLES:-4} --densities $DENS \
    -o $D/passkey > $R/$name.passkey.log 2>&1; echo "$name passkey rc=$? $(( $(date +%s)-S ))s"
  timeout 90 python3 -m seerattn eval ppl $E --contexts ${PPL_CTX:-8192} --samples ${PPL_SAMPLES:-16} --densities $DENS \
    -o $D/ppl > $R/$name.ppl.log 2>&1; echo "$name ppl rc=$? $(( $(date +%s)-S ))s"
  timeout 60 python3 -m seerattn eval masks $E --context ${PPL_CTX:-8192} --densities 0.1 \
    -o $D/masks > $R/$name.masks.log 2>&1; echo "$name masks rc=$? $(( $(date +%s)-S ))s"
  rm -rf $D/data_cache $D/checkpoints
done
tar czf $OUT/sweep.tgz $R
python3 - "$R" <<'PY'
import json, sys
from pathlib import Path
for d in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    def load(f):
        p = d / f
        return json.loads(p.read_text())["results"] if p.exists() else []
    s = json.loads((d / "summary.json").read_text())["results"] if (d / "summary.json").exists() else {}
    pk = {r["label"]: r["mean_accuracy"] for r in load("passkey/passkey.json")}
    pp = {r["label"]: (r["ppl"], r["ppl_tail"]) for r in load("ppl/ppl.json")}
    mr = {r["label"]: round(r["mass_recall"], 4) for r in load("masks/masks.json")
          if r.get("method") == "seer" and r["layer"] == "mean"}
    print(d.name, "final", s.get("final"),
          "passkey", pk, "ppl", pp, "mass_recall", mr)
PY
