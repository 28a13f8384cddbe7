#!/usr/bin/env bash
# Session 28, call 1 (on the device, repo root = wip/s28-combo; carry .gpu/base = `git archive main src benchmarks`,
# .gpu/sel = wip/select-prefix, .gpu/n128 = wip/proj-n128): the selection from a row's common bits against main (two
# alternating rounds, lists hashed) and its GPU tests; the one-product projection against main (two alternating rounds,
# outputs hashed) and its tiles.
. benchmarks/session.sh call1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
SEL=docs/experiments/prefill-gate-policy/session28/select_ab.py
PROJ=docs/experiments/prefill-gate-policy/session27/proj_ab.py
for i in 1 2; do
  for tree in base sel; do
    (cd .gpu/$tree && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$SEL" --tag $tree$i --json "../../$R/sel_$tree$i.json") \
      > "$R/sel_$tree$i.log" 2>&1
    step sel_$tree$i $?
  done
done
python3 - "$R" <<'PY'
import json, sys, glob
rows = [r for f in sorted(glob.glob(sys.argv[1] + "/sel_*.json")) for r in json.load(open(f))]
cases = sorted({(r["nq"], r["rows"], r["density"]) for r in rows})
for c in cases:
    line = [f"{t}: {r['ms']:.4f} {r['digest'][:6]}" for t in ("base1", "sel1", "base2", "sel2")
            for r in rows if (r["nq"], r["rows"], r["density"]) == c and r["tag"] == t]
    print(c, " | ".join(line))
PY
(cd .gpu/sel && PYTHONPATH=src:. timeout -k 5 150 python3 -m pytest -q -m gpu ../../tests/test_select_kernels.py \
  -p no:cacheprovider) > "$R/sel_gpu_tests.log" 2>&1
step sel_gpu_tests $?; tail -2 "$R/sel_gpu_tests.log"
for i in 1 2; do
  for tree in base n128; do
    (cd .gpu/$tree && PYTHONPATH=src:. timeout -k 5 100 python3 "../../$PROJ" --tag $tree$i) > "$R/proj_$tree$i.log" 2>&1
    step proj_$tree$i $?; grep part "$R/proj_$tree$i.log" | cut -c1-200
  done
done
(cd .gpu/n128 && PYTHONPATH=src:. timeout -k 5 150 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --parts proj \
  --proj-tiles 64,16,4,4 64,32,4,4 64,64,4,2 128,32,8,3 --json "../../$R/proj_tiles.json") > "$R/proj_tiles.log" 2>&1
step proj_tiles $?; tail -14 "$R/proj_tiles.log"
finish
