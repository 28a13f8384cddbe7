#!/usr/bin/env bash
# One call on a 2-GPU machine for issue 18: fine-tuning with FSDP2 over NCCL on 2 GPUs against 1 GPU, same global
# batch, seed and data order. From the repository root:
#
#   bash benchmarks/finetune_multigpu.sh        # on nvidia-h200-x2 (carry .carry: the training corpus); ~9 min
#   DRY=1 bash benchmarks/finetune_multigpu.sh  # on the CPU: 2 gloo processes, tiny settings; checks it end to end
#
# Runs (every one through benchmarks/finetune_multigpu.py = seerattn.train.finetune + peak memory per rank; 2-process
# runs under torchrun with parallel=fsdp, 1-process runs with the same recipe, where fsdp has nothing to shard):
#   t1-b90, t2-b90      recipes/testbed-yarn-32k.yaml as is (testbed/model, 90 % sparsity, 20 steps x 8 x 32k)
#   t2-b90-kill         the same on 2 GPUs, checkpoint every 5 steps, SIGKILL to the whole torchrun group once the
#                       step-10 checkpoint exists, then --resume: metrics.jsonl and the saved model/gates must equal
#                       t2-b90's bitwise (the CPU test shows it on gloo; NCCL's reductions are deterministic for a
#                       fixed world size and algorithm, the kernels as far as they are)
#   e1-*, e2-*          a Llama-3-8B-shaped model (random weights, fp32 master, bf16 autocast, E_LAYERS=8 decoder
#                       layers so that 1 GPU holds weights + grads + AdamW for the comparison), the testbed recipe's
#                       data and YaRN 8k -> 32k, fresh gates (1 distillation step) then 3 joint steps of a global
#                       batch of E_BATCH=2 x 32k, sparse 90 % and dense; stopped after step 4 of 5 (--stop-after) so
#                       that no multi-GB checkpoint or model is written: these runs measure the step only
#   t1-dense, t2-dense  the testbed recipe with attention=dense (the dense YaRN baseline)
# Each run gets min(its cap, what is left of BUDGET_S) and is skipped when too little is left; the summary always runs.
# $OUT gets: results.md (step time, tokens/s, peak GiB per rank, 1-vs-2 curve differences, the resume check),
# results.json, logs.tgz (logs, metrics.jsonl, summaries, peak-rank*.json; no weights).
# Env: NPROC (2), E_LAYERS (8), E_BATCH (2), BUDGET_S (540), TRAIN_DATA (.carry/finetune_train.txt.xz).
set -u
DRY=${DRY:-0}
NPROC=${NPROC:-2}
if [ "$DRY" = 1 ]; then
  export PYTHONUNBUFFERED=1 PYTHONPATH=src OMP_NUM_THREADS=1
  OUT=${OUT:-/tmp/multigpu_dry_out}; R=runs/multigpu_dry; rm -rf "$R"; mkdir -p "$R" "$OUT"; S=$(date +%s)
  BUDGET_S=${BUDGET_S:-1800}; SEQ=512; SHAPE=smoke; T_RUN=300; KILL_AT=2; SAVE=1
  # the testbed recipe at 512 tokens (RoPE x4 from 128), 4 steps of 2 sequences, the reference attention, gloo
  SHRINK=(seq_len=$SEQ rope.original_max_position_embeddings=128 steps=4 batch_size=2 micro_batch_size=1
          warmup_steps=1 max_data_tokens=20000 impl=reference device=cpu)
else
  . benchmarks/gpu_run_env.sh multigpu
  BUDGET_S=${BUDGET_S:-540}; SEQ=32768; SHAPE=llama-3-8b; T_RUN=150; KILL_AT=10; SAVE=5; SHRINK=()
fi
E_LAYERS=${E_LAYERS:-8}; E_BATCH=${E_BATCH:-2}
TRAIN_DATA=${TRAIN_DATA:-.carry/finetune_train.txt.xz}
[ -f "$TRAIN_DATA" ] || { echo "no training corpus at $TRAIN_DATA (see recipes/testbed-yarn-32k.yaml; set TRAIN_DATA)"; exit 2; }
COMMON=("data=[$TRAIN_DATA]" data_cache_dir=$R/cache progress=false parallel=fsdp "${SHRINK[@]}")
DEADLINE=$(( S + BUDGET_S ))
DRV=(-m benchmarks.finetune_multigpu recipes/testbed-yarn-32k.yaml)

cap_for() {  # CAP: prints min(CAP, seconds left), or nothing when under 15 s are left
  local left=$(( DEADLINE - $(date +%s) )) cap=$1; [ $left -lt $cap ] && cap=$left
  [ $cap -ge 15 ] && echo $cap
}
run() {  # NAME NPROC ARGS...: one launch (python3 for 1 process, torchrun otherwise) with a timeout, logged
  local name=$1 n=$2; shift 2
  local cap; cap=$(cap_for $T_RUN) || true
  if [ -z "$cap" ]; then echo "$name skipped (budget)" | tee -a $R/times.txt; return; fi
  local launch=(python3); [ "$n" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node $n)
  local t0=$(date +%s)
  timeout $cap "${launch[@]}" "${DRV[@]}" "$@" >> $R/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s (at $(( $(date +%s) - S ))s)" | tee -a $R/times.txt
}

# ---- the testbed recipe at 90 % sparsity: 1 vs NPROC processes
run t1-b90 1 --set output_dir=$R/t1-b90 "${COMMON[@]}"
run t2-b90 $NPROC --set output_dir=$R/t2-b90 "${COMMON[@]}"

# ---- a real kill on NPROC processes once the step-KILL_AT checkpoint exists, then --resume
K=$R/t2-b90-kill
cap=$(cap_for $T_RUN) || true
if [ -n "$cap" ]; then
  t0=$(date +%s)
  timeout $cap python3 -m torch.distributed.run --standalone --nproc_per_node $NPROC "${DRV[@]}" \
    --set output_dir=$K save_every=$SAVE "${COMMON[@]}" > $R/t2-b90-kill.log 2>&1 &
  pid=$!
  ckpt=$K/checkpoints/$(printf 'step_%07d' $KILL_AT)  # seerattn.train.checkpoint's folder name
  while kill -0 $pid 2>/dev/null && [ ! -d $ckpt ]; do sleep 0.2; done
  if kill -0 $pid 2>/dev/null; then
    # as a machine failure would: every rank and the launcher at once (torchrun starts each rank in its own session,
    # so a signal to the launcher's group would leave the ranks running): by id, the ranks are the launcher's children
    agent=$(ps -o pid= --ppid $pid | tr -d ' '); ranks=$(ps -o pid= --ppid "$agent" | tr -d ' ')
    kill -KILL $ranks $agent
    echo "killed ranks $(echo $ranks) and torchrun $agent after checkpoint step_$KILL_AT" | tee -a $R/times.txt
  else
    echo "the run ended before the kill (no kill tested)" | tee -a $R/times.txt
  fi
  wait $pid 2>/dev/null
  echo "t2-b90-kill (killed run) $(( $(date +%s) - t0 ))s" | tee -a $R/times.txt
  run t2-b90-resume $NPROC --resume --set output_dir=$K save_every=$SAVE "${COMMON[@]}"
else
  echo "t2-b90-kill skipped (budget)" | tee -a $R/times.txt
fi

# ---- the Llama-3-8B-shaped model, 1 vs NPROC GPUs, sparse 90 % and dense: 1 distillation + 3 joint steps (sparse)
E=(--shape $SHAPE --layers $E_LAYERS)
ESET=(model=llama-3-8b-shaped-random seq_len=$SEQ batch_size=$E_BATCH micro_batch_size=1 steps=4 warmup_steps=1
      save_every=1000)
run e1-b90 1 "${E[@]}" --stop-after 4 --set output_dir=$R/e1-b90 "${COMMON[@]}" "${ESET[@]}" init_gates=null distill_steps=1
run e2-b90 $NPROC "${E[@]}" --stop-after 4 --set output_dir=$R/e2-b90 "${COMMON[@]}" "${ESET[@]}" init_gates=null distill_steps=1
run e1-dense 1 "${E[@]}" --stop-after 4 --set output_dir=$R/e1-dense "${COMMON[@]}" "${ESET[@]}" attention=dense \
  init_gates=null steps=5
run e2-dense $NPROC "${E[@]}" --stop-after 4 --set output_dir=$R/e2-dense "${COMMON[@]}" "${ESET[@]}" attention=dense \
  init_gates=null steps=5

# ---- the dense YaRN baseline of the testbed
run t1-dense 1 --set output_dir=$R/t1-dense attention=dense init_gates=null "${COMMON[@]}"
run t2-dense $NPROC --set output_dir=$R/t2-dense attention=dense init_gates=null "${COMMON[@]}"

# ---- results
python3 - "$R" "$OUT" "$NPROC" <<'PY'
import json, statistics, sys
from pathlib import Path

R, OUT, N = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def metrics(run):
    p = R / run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []
def peaks(run):
    out = []
    for p in sorted((R / run).glob("peak-rank*.json")):
        out.append(json.loads(p.read_text()))
    return out
def timing(rows):  # joint steps after the first joint step (compilation and warm-up)
    joint = [r for r in rows if r.get("phase") == "joint"][1:]
    if not joint:
        return None, None
    st = statistics.median(r["step_time_s"] for r in joint)
    return st, statistics.median(r["tokens_per_s"] for r in joint)
runs = ["t1-b90", "t2-b90", "t2-b90-kill", "e1-b90", "e2-b90", "e1-dense", "e2-dense", "t1-dense", "t2-dense"]
out = {"runs": {}, "curves": {}, "resume": None}
lines = ["| run | processes | steps logged | median joint step s | tokens/s | peak allocated GiB per rank | final ce | final kl |",
         "|---|---|---|---|---|---|---|---|"]
for run in runs:
    rows, pk = metrics(run), peaks(run)
    if not rows:
        lines.append(f"| {run} | - | 0 | - | - | - | - | - |")
        continue
    st, tps = timing(rows)
    world = pk[0]["world_size"] if pk else None
    gib = [p["max_allocated_gib"] for p in pk]
    out["runs"][run] = {"world_size": world, "steps": len(rows), "step_time_s_median": st, "tokens_per_s_median": tps,
                        "peak_allocated_gib": gib, "peak_reserved_gib": [p["max_reserved_gib"] for p in pk],
                        "final": {k: rows[-1].get(k) for k in ("ce", "kl", "loss", "grad_norm", "density")}}
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"
    lines.append(f"| {run} | {world} | {len(rows)} | {f(st)} | {f(tps, 0)} | "
                 f"{' / '.join(f(g, 1) for g in gib) or '-'} | {f(rows[-1].get('ce'), 4)} | {f(rows[-1].get('kl'), 4)} |")
lines += ["", f"1 vs {N} processes, same global batch: largest difference over the logged steps (absolute; relative)",
          "", "| pair | steps | ce | kl | grad_norm |", "|---|---|---|---|---|"]
for a, b in (("t1-b90", "t2-b90"), ("e1-b90", "e2-b90"), ("e1-dense", "e2-dense"), ("t1-dense", "t2-dense")):
    ra, rb = metrics(a), metrics(b)
    if not ra or not rb:
        continue
    n = min(len(ra), len(rb))
    d = {}
    for key in ("ce", "kl", "grad_norm"):
        diffs = [(abs(x[key] - y[key]), abs(x[key] - y[key]) / max(abs(x[key]), 1e-30)) for x, y in zip(ra[:n], rb[:n])]
        d[key] = max(diffs)
    out["curves"][f"{a} vs {b}"] = {"steps": n, **{k: {"abs": v[0], "rel": v[1]} for k, v in d.items()},
                                   "ce_1": [r["ce"] for r in ra[:n]], "ce_n": [r["ce"] for r in rb[:n]]}
    lines.append(f"| {a} vs {b} | {n} | " + " | ".join(f"{v[0]:.2e}; {v[1]:.1e}" for v in d.values()) + " |")
ref, kill = metrics("t2-b90"), metrics("t2-b90-kill")
if ref and kill:
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in rows]
    same_metrics = strip(ref) == strip(kill)
    from safetensors.torch import load_file
    def tensors(run):
        t = {}
        for f in sorted((R / run).glob("*/*.safetensors")):  # model/ and adapter/
            t.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
        return t
    x, y = tensors("t2-b90"), tensors("t2-b90-kill")
    same_files = bool(x) and x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)
    resumed = sorted(p.name for p in (R / "t2-b90-kill").glob("environment-resume-*.json"))
    out["resume"] = {"metrics_bitwise_equal": same_metrics, "outputs_bitwise_equal": same_files, "resumed": resumed}
    lines += ["", f"kill + --resume on {N} processes ({', '.join(resumed) or 'no resume record'}): metrics.jsonl "
              f"bitwise equal to t2-b90: {same_metrics}; model + gates bitwise equal: {same_files}"]
(OUT / "results.md").write_text("\n".join(lines) + "\n")
(OUT / "results.json").write_text(json.dumps(out, indent=1) + "\n")
PY
tar czf $OUT/logs.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude=checkpoints --exclude=cache \
  --exclude=tokenizer.json $R
cat $R/times.txt
cat $OUT/results.md
