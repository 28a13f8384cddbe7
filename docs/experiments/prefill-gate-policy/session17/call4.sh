#!/usr/bin/env bash
# Session 17, device call 4 (issue 16, quality unchanged): the README's quickstart on the GPU with this tree and with
# 79322c3's src (.gpu/main_src): perplexity, passkey, density and recall should agree; then one profiled 128k forward
# (where the policy range's time goes beside the selection kernel).
. benchmarks/session.sh s17c4
timeout 110 python3 -m seerattn quickstart --device cuda --output "$R/qs_new" > "$R/quickstart_new.log" 2>&1
step quickstart-new $?; grep -A6 "^seerattn quickstart" "$R/quickstart_new.log"
timeout 110 env PYTHONPATH=.gpu/main_src/src:. python3 -m seerattn quickstart --device cuda --output "$R/qs_main" \
  > "$R/quickstart_main.log" 2>&1
step quickstart-main $?; grep -A6 "^seerattn quickstart" "$R/quickstart_main.log"
timeout 200 python3 -m benchmarks.prefill --seqlens 131072 --densities 0.1 --warmup 1 --reps 1 --profile 40 \
  --json "$R/prefill128k_profile.json" > "$R/prefill128k_profile.log" 2>&1
step prefill-128k-profile $?; grep -E "^T=|seer\.|_kernel" "$R/prefill128k_profile.log" | tail -n 16
finish
