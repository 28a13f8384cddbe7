# Sourced by the one-call device scripts (`. benchmarks/session.sh NAME`, from the repo root, with $OUT set): the
# environment, a fresh run folder runs/NAME, `step NAME RC` (a line "NAME rc=RC <seconds>s" appended to
# runs/NAME/steps.txt and printed as it happens, so a call cut at its limit still says how far it got), and
# `finish` (the run folder packed into $OUT/NAME.tgz, the steps printed).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src:.
OUT=${OUT:?set OUT to the folder whose files come back}
R=runs/${1:?name the run: . benchmarks/session.sh NAME}
rm -rf "$R"
mkdir -p "$R" "$OUT"
S=$(date +%s)
step() { echo "$1 rc=$2 $(( $(date +%s) - S ))s" | tee -a "$R/steps.txt"; }
finish() { tar czf "$OUT/$(basename "$R").tgz" "$R" && cat "$R/steps.txt"; }
