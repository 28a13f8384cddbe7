#!/usr/bin/env bash
# Session 16, device call 6 (issue 16, quality unchanged): the README's quickstart on the GPU (the fused Triton gate,
# the selection kernel and the block-sparse kernel on the testbed) with this tree and with the tree before session 16
# (archive of f9a416f's src in .gpu/main_src): perplexity, passkey, density and recall should agree.
. benchmarks/session.sh s16c6
timeout 110 python3 -m seerattn quickstart --device cuda --output "$R/qs_new" > "$R/quickstart_new.log" 2>&1
step quickstart-new $?; grep -A6 "^seerattn quickstart" "$R/quickstart_new.log"
timeout 110 env PYTHONPATH=.gpu/main_src/src:. python3 -m seerattn quickstart --device cuda --output "$R/qs_main" \
  > "$R/quickstart_main.log" 2>&1
step quickstart-main $?; grep -A6 "^seerattn quickstart" "$R/quickstart_main.log"
finish
