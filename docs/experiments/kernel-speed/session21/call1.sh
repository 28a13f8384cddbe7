#!/usr/bin/env bash
# Session 21, call 1 (the tree of 51da279 with loader_info.patch applied: the tile metadata from the loader, static
# and dynamic tile orders; .gpu/base = 51da279's src, session 20's kernel): GPU tests of the warp-specialised forward; order.py
# alternating the two trees in separate processes (two rounds).
# Device call: carry .gpu/base.
. benchmarks/session.sh s21c1
save() { tar czf "$OUT/$(basename "$R").tgz" "$R"; }  # after each step: a call cut at its limit still returns
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout -k 10 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gpu_kernels.py -k "hopper_ws" \
  > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 8 "$R/gpu_tests.log" | cut -c1-300; save
order() {  # one round of order.py over the trees given
  for tree in "$@"; do
    P=src:.; [ $tree != new ] && P=.gpu/$tree/src:.
    PYTHONPATH=$P timeout -k 10 100 python3 docs/experiments/kernel-speed/session21/order.py --tree $tree \
      --json "$R/order_${tree}_$round.json" > "$R/order_${tree}_$round.log" 2>&1
    step order-$tree-$round $?; cut -c1-200 "$R/order_${tree}_$round.log" | grep -v "^$"; save
  done
}
round=1 order base new
round=2 order new base
finish
