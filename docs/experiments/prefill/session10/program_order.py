"""The block-sparse forward's program order on the GPU: every head of a query-tile position together (the order
before session 10) against a KV-head-major order (``sparse_fwd.KV_MAJOR``), same masks, same inputs.

    # on the tree it ran on, a5aa9a3 (one folder up there): sparse_fwd.KV_MAJOR, the A/B switch, was removed
    # once KV-major won, so it does not run on later trees
    git checkout a5aa9a3 && PYTHONPATH=src:. python3 "$(git ls-files '*/program_order.py')" --json program_order.json

Why: at 10 % the forward in the 8B-shaped model runs at the HBM rate of its K/V block loads (each kept
(query tile, key block) pair of a query head loads a 32 KB K+V tile; at 128k that is ~215 GB a layer, ~45 ms at
4.8 TB/s, and the profile shows 43.6 ms). With every head of one tile position resident at once, the programs
in flight read all 8 KV heads (128 MB at 32k), more than the 50 MB L2; KV-head-major, one KV head (16 MB at 32k).

Per case (Llama-3.1-8B heads, bf16, block 64, density 0.1, batch 1): q/k/v made as transformers hands them
([B, T, H, D] memory, [B, H, T, D] views); the tuner picks each order's config (its cache cleared in between);
then the new order also runs the old order's config and its output is asserted bitwise equal to the old one's
(each program computes the same thing; only the order differs). Median ms of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from benchmarks.attention import synthetic_mask
from seerattn.ops._triton import config as tcfg
from seerattn.ops._triton import sparse_fwd

CASES = [  # (T, mask kind, mask heads)
    (32768, "structured", "hq"),
    (32768, "random", "hq"),
    (32768, "structured", "hkv"),
    (32768, "random", "hkv"),
    (131072, "structured", "hq"),
    (131072, "random", "hq"),
]
HQ, HKV, D, BS = 32, 8, 128, 64


def run(q, k, v, mask, config=None):
    return sparse_fwd.block_sparse_attention_fwd(
        q, k, v, mask.kv_num_blocks, mask.kv_indices, BS, D**-0.5, config=config
    )[0]


def bench(q, k, v, mask, config) -> float:
    return do_bench(lambda: run(q, k, v, mask, config), warmup=5, rep=50, return_mode="median")


def case(t: int, kind: str, heads: str, density: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(1, t, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(1, t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    mask = synthetic_mask(HQ if heads == "hq" else HKV, t, BS, density, kind, seed=1)
    row = {"t": t, "mask": kind, "mask_heads": heads, "density": density}
    outs, cfgs = {}, {}
    for order, name in ((False, "tile_major"), (True, "kv_major")):
        sparse_fwd.KV_MAJOR = order
        tcfg._TUNED.clear()
        outs[name] = run(q, k, v, mask)
        cfgs[name] = next(iter(tcfg._TUNED.values()), None)  # None: one candidate, no tuning
        row[f"{name}_config"] = cfgs[name].short() if cfgs[name] is not None else None
        row[f"{name}_ms"] = bench(q, k, v, mask, cfgs[name])
    old = cfgs["tile_major"]
    assert torch.equal(run_with(True, q, k, v, mask, old), run_with(False, q, k, v, mask, old)), "order changed out"
    row["kv_major_old_config_ms"] = bench(q, k, v, mask, old)
    row["speedup"] = row["tile_major_ms"] / row["kv_major_ms"]
    return row


def run_with(order: bool, q, k, v, mask, config):
    saved, sparse_fwd.KV_MAJOR = sparse_fwd.KV_MAJOR, order
    try:
        return run(q, k, v, mask, config)
    finally:
        sparse_fwd.KV_MAJOR = saved


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    p.add_argument("--density", type=float, default=0.1)
    args = p.parse_args()
    rows = []
    for t, kind, heads in CASES:
        row = case(t, kind, heads, args.density)
        print(
            f"T {t:>6} {kind:<10} {heads:<3}  tile-major {row['tile_major_ms']:7.3f} ms ({row['tile_major_config']})"
            f"  kv-major {row['kv_major_ms']:7.3f} ms ({row['kv_major_config']})"
            f"  kv-major, tile-major's config {row['kv_major_old_config_ms']:7.3f}  x {row['speedup']:.2f}",
            flush=True,
        )
        rows.append(row)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
