#!/usr/bin/env bash
# One GPU call for issue 13 (sections 3 and 4): the testbed's YaRN 8k -> 32k experiment and the training-step
# benchmark. From the repository root:
#
#   bash benchmarks/finetune_session.sh            # on one H200 (~8 min: four ~1-min runs, evals, the benchmark)
#   DRY=1 bash benchmarks/finetune_session.sh      # on the CPU, tiny settings (1k context): checks it end to end
#
# Runs (recipes/testbed-yarn-32k.yaml, same token budget each): (a) dense YaRN fine-tune, (b50)/(b90) SeerAttention
# YaRN fine-tune at 50 % / 90 % sparsity, (c) gates distilled after (a) (recipes/testbed-yarn-32k-gates.yaml);
# evaluated with `seerattn eval` with (d) testbed/model + testbed/gates under YaRN and no fine-tuning: PPL at 32k
# (whole window and last 4k tokens) and 8k, passkey at 8k/16k/32k (5 depths x 12 keys), and StreamingLLM and
# vertical-slash at 90 % on (a)'s model. Then benchmarks/train_step.py at 32k and 64k (Llama-3.1-8B shape).
#
# Needs (no network, no ../shared): the training corpus (train books joined by NUL, xz; see the recipe's header)
# at TRAIN_DATA (default .carry/train.txt.xz, else .carry/finetune_train.txt.xz) and held-out books for eval at
# EVAL_DATA (default: the first of data/books-sample, data/books, .carry/test that exists; a books folder).
# Env: RUNS (which of a b90 b90floor b50 c d to train/evaluate; default "a b90 b50 c d"; b90floor = b90 with the
# `floor` row allocation in training), ALLOCATIONS (row allocations of the seer evaluations, comma list, default
# row), EVALS (which runs to evaluate, default RUNS), TS_LAYERS (decoder layers of the benchmark, 16), SKIP_BENCH=1,
# BUDGET_S (seconds for all steps, 500: each step's timeout is cut to what is left, later steps are skipped).
# $OUT gets (<= 7 files): results.md, results.json, train_step.json, b90[floor]-adapter.tgz (the 90 % gates), logs.tgz.
set -u
DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
  export PYTHONUNBUFFERED=1 PYTHONPATH=src
  OUT=${OUT:-/tmp/finetune_dry_out}; R=runs/finetune_dry; rm -rf "$R"; mkdir -p "$R" "$OUT"; S=$(date +%s)
  C8=256; C16=512; C32=1024; TAIL=128; PPL_N=2; PK_N=1; TRAIN_LEN=256; T_TRAIN=900; T_EVAL=600
  BUDGET_S=${BUDGET_S:-7200}; PK_ARGS=(--depths 0,1)
  # the same recipes at 1k tokens: RoPE x4 from 256, 2 steps of 2 sequences
  SHRINK=(seq_len=$C32 rope.original_max_position_embeddings=$TRAIN_LEN steps=2 batch_size=2 micro_batch_size=1
          warmup_steps=1 max_data_tokens=20000 impl=reference device=cpu)
  SHRINK_C=(seq_len=$C32 steps=2 batch_size=2 micro_batch_size=1 warmup_steps=1 max_data_tokens=20000 impl=reference
            device=cpu)
else
  . benchmarks/gpu_run_env.sh finetune
  C8=8192; C16=16384; C32=32768; TAIL=4096; PPL_N=8; PK_N=12; TRAIN_LEN=8192; T_TRAIN=150; T_EVAL=120
  SHRINK=(); SHRINK_C=(); PK_ARGS=()
fi
if [ -z "${TRAIN_DATA:-}" ]; then
  TRAIN_DATA=.carry/train.txt.xz; [ ! -f $TRAIN_DATA ] && [ -f .carry/finetune_train.txt.xz ] && TRAIN_DATA=.carry/finetune_train.txt.xz
fi
if [ -z "${EVAL_DATA:-}" ]; then
  for d in data/books-sample data/books .carry/test; do [ -e "$d" ] && EVAL_DATA=$d && break; done
fi
[ -f "$TRAIN_DATA" ] || { echo "no training corpus at $TRAIN_DATA (set TRAIN_DATA)"; exit 2; }
[ -n "${EVAL_DATA:-}" ] || { echo "no eval books (data/books-sample, data/books, .carry/test; set EVAL_DATA)"; exit 2; }
RUNS=" ${RUNS:-a b90 b50 c d} "
EVALS=" ${EVALS:-$RUNS} "
has() { [[ "$RUNS" == *" $1 "* ]]; }
hasev() { [[ "$EVALS" == *" $1 "* ]]; }
ALLOC=(--allocations "${ALLOCATIONS:-row}")
echo "train data $TRAIN_DATA, eval data $EVAL_DATA, runs$RUNS in $R"
COMMON=("data=[$TRAIN_DATA]" data_cache_dir=$R/cache progress=false)
# Every step gets min(its cap, the time left before the deadline) and is skipped when too little is left, so
# that the summary below always runs inside the call's limit (a killed call would bring nothing back).
DEADLINE=$(( S + ${BUDGET_S:-500} ))
step() {  # NAME CAP_S COMMAND...: run with a timeout, log to $R/NAME.log, note rc and elapsed time
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) )); [ $left -lt $cap ] && cap=$left
  if [ $cap -lt 15 ]; then echo "$name skipped (${left}s left)" | tee -a $R/times.txt; return; fi
  timeout $cap "$@" > $R/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - S ))s" | tee -a $R/times.txt
}

# ---- the training-step benchmark first: its time is predictable (capped at 130 s), the testbed takes the rest
if [ -z "${SKIP_BENCH:-}" ]; then
  if [ "$DRY" = 1 ]; then
    step train-step 600 python3 -m benchmarks.train_step --smoke --json $R/train_step.json
  else
    step train-step 180 python3 -m benchmarks.train_step --seqlens 32768,65536 --layers ${TS_LAYERS:-16} --reps 2 --target-every 4 \
      --profile --json $R/train_step.json
  fi
fi

# ---- training: (a), (b90), (b50), then (c) on (a)'s model
F="python3 -m seerattn finetune recipes/testbed-yarn-32k.yaml --set"
has a && step train-a $T_TRAIN $F output_dir=$R/a attention=dense init_gates=null "${COMMON[@]}" "${SHRINK[@]}"
has b90 && step train-b90 $T_TRAIN $F output_dir=$R/b90 "${COMMON[@]}" "${SHRINK[@]}"
has b90floor && step train-b90floor $T_TRAIN $F output_dir=$R/b90floor policy.allocation=floor "${COMMON[@]}" "${SHRINK[@]}"
has b50 && step train-b50 $T_TRAIN $F output_dir=$R/b50 policy.value=0.5 "${COMMON[@]}" "${SHRINK[@]}"
has c && step train-c $T_TRAIN python3 -m seerattn distill recipes/testbed-yarn-32k-gates.yaml --set output_dir=$R/c \
  model=$R/a/model tokenizer=$R/a/model "${COMMON[@]}" "${SHRINK_C[@]}"

# ---- evaluation: one ppl and one passkey call per model
ev() {  # NAME MODEL GATES(or -) METHODS DENSITIES [extra args]
  local name=$1 model=$2 gates=$3 methods=$4 dens=$5; shift 5
  local g=(); [ "$gates" != - ] && g=(--gates "$gates")
  local common=(--model "$model" "${g[@]}" --data "$EVAL_DATA" --methods "$methods" --densities "$dens" --no-progress)
  step eval-$name-ppl $T_EVAL python3 -m seerattn eval ppl "${common[@]}" --contexts $C8,$C32 --tail $TAIL \
    --samples $PPL_N "$@" -o $R/eval/$name/ppl
  step eval-$name-passkey $T_EVAL python3 -m seerattn eval passkey "${common[@]}" --contexts $C8,$C16,$C32 \
    --samples $PK_N "${PK_ARGS[@]}" "$@" -o $R/eval/$name/passkey
}
mkdir -p $R/eval
hasev b90 && ev b90 $R/b90/model $R/b90/adapter dense,seer 0.1 "${ALLOC[@]}"
hasev b90floor && ev b90floor $R/b90floor/model $R/b90floor/adapter dense,seer 0.1 "${ALLOC[@]}"
hasev a && ev a $R/a/model - dense,streaming,vertical_slash 0.1 "${ALLOC[@]}"
hasev c && ev c $R/a/model $R/c/adapter seer 0.1 "${ALLOC[@]}"
hasev b50 && ev b50 $R/b50/model $R/b50/adapter dense,seer 0.5
hasev d && ev d testbed/model testbed/gates dense,seer 0.1 --train-length $TRAIN_LEN

# ---- results: table, JSON, the 90 % gates, logs
python3 - "$R" "$OUT" $C8 $C16 $C32 <<'PY'
import json, sys
from pathlib import Path

R, OUT = Path(sys.argv[1]), Path(sys.argv[2])
C8, C16, C32 = (f"{int(c) // 1024}k" if int(c) >= 1024 else c for c in sys.argv[3:6])
load = lambda p: json.loads(p.read_text()) if p.is_file() else None
out = {"train": {}, "ppl": {}, "passkey": {}, "train_step": None}
for run in ("a", "b50", "b90", "b90floor", "c"):
    rec = load(R / run / "summary.json")
    if rec:
        out["train"][run] = {k: rec["results"].get(k) for k in ("steps", "tokens", "wall_time_s", "final")}
lines = [f"| model | method | PPL @{C32} | tail PPL @{C32} | PPL @{C8} | tail PPL @{C8} | passkey {C8}/{C16}/{C32} |",
         "|---|---|---|---|---|---|---|"]
for name in ("d", "a", "b50", "b90", "b90floor", "c"):
    ppl = load(R / "eval" / name / "ppl" / "ppl.json")
    pk = load(R / "eval" / name / "passkey" / "passkey.json")
    rows = {}
    for r in (ppl or {}).get("results", []):
        rows.setdefault(r["label"], {})[r["context"]] = r
    keys = {r["label"]: r for r in (pk or {}).get("results", [])}
    out["ppl"][name] = [{k: r[k] for k in ("label", "context", "ppl", "ppl_tail", "tail", "density")}
                        for by in rows.values() for r in by.values()]
    out["passkey"][name] = [{k: r.get(k) for k in ("label", "contexts", "accuracy_by_context", "mean_accuracy",
                                                   "density")} for r in keys.values()]
    for label in sorted(set(rows) | set(keys)):
        by = rows.get(label, {})
        c32, c8 = (by.get(c) for c in sorted(by)[-1:] + sorted(by)[:1]) if by else (None, None)
        f = lambda r, k: f"{r[k]:.3f}" if r else "-"
        acc = "/".join(f"{a:.2f}" for a in keys[label]["accuracy_by_context"]) if label in keys else "-"
        row = f"{f(c32, 'ppl')} | {f(c32, 'ppl_tail')} | {f(c8, 'ppl')} | {f(c8, 'ppl_tail')}"
        lines.append(f"| {name} | {label} | {row} | {acc} |")
ts = load(R / "train_step.json")
if ts:
    out["train_step"] = ts["results"]
    lines += ["", "| train step | T | ms | tokens/s | peak GiB | speed-up | density |", "|---|---|---|---|---|---|---|"]
    for r in ts["results"]:
        lines.append(f"| {r['method']} | {r['seq_len']} | {r['ms']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_gib'] if r['peak_gib'] is None else round(r['peak_gib'], 1)} | {r['speedup']:.2f} | "
                     f"{r['density']:.3f} |")
lines += ["", "| run | steps | wall s | final |", "|---|---|---|---|"]
for run, t in out["train"].items():
    fin = {k: round(v, 4) for k, v in (t["final"] or {}).items() if isinstance(v, float)}
    lines.append(f"| {run} | {t['steps']} | {t['wall_time_s']:.0f} | {fin} |")
(OUT / "results.md").write_text("\n".join(lines) + "\n")
(OUT / "results.json").write_text(json.dumps(out, indent=1) + "\n")
PY
[ -f $R/train_step.json ] && cp $R/train_step.json $OUT/
[ -d $R/b90/adapter ] && tar czf $OUT/b90-adapter.tgz -C $R/b90 adapter
[ -d $R/b90floor/adapter ] && tar czf $OUT/b90floor-adapter.tgz -C $R/b90floor adapter
tar czf $OUT/logs.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude=checkpoints --exclude=cache \
  --exclude=tokenizer.json $R
cat $R/times.txt
cat $OUT/results.md
