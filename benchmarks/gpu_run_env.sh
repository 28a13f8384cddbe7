# Sourced by the one-call GPU scripts: `. benchmarks/gpu_run_env.sh NAME` sets OUT (files that come back),
# R=runs/NAME (a fresh folder: a warm machine keeps ignored folders between calls) and S (start time),
# and records the GPU. No commit is recorded here: the device's copy has no reliable git HEAD, so the
# sender notes the commit next to the results.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-/tmp/out}; R=runs/$1; rm -rf "$R"; mkdir -p "$R"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
S=$(date +%s)
