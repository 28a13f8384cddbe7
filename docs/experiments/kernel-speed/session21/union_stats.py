"""Session 21: how much two adjacent query blocks of one head share, on per-query-head density masks (the question
behind a Hopper tile of one head's two consecutive 64-token query blocks walking the union of their lists, sharing
every K / V tile as the per-group tile does). Per mask: kept blocks summed over rows (each row's own steps), the union
of rows 2m and 2m + 1 summed over pairs (the shared walk's steps), and the ratio of the walk's K / V tiles to the
per-head kernel's (which loads each row's list). Structured and random density masks of ``benchmarks.attention``,
32 query heads, 64-token blocks, 10 %.

    PYTHONPATH=src:. python3 docs/experiments/kernel-speed/session21/union_stats.py --json runs/union_stats.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.attention import synthetic_mask
from seerattn.ops._triton.sparse_fwd import build_union_lists


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="32768,131072")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    rows = []
    for t in (int(x) for x in args.seqlens.split(",")):
        for kind in ("structured", "random"):
            mask = synthetic_mask(32, t, 64, 0.1, kind, seed=1)
            unum, _ = build_union_lists(mask.kv_num_blocks, mask.kv_indices, 2)
            own = int(mask.kv_num_blocks.sum())
            union = int(unum.sum())
            row = dict(seqlen=t, mask=kind, row_steps=own, union_steps=union,
                       union_vs_own_kv_tiles=union / own, union_flops_vs_own=2 * union / own)  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
