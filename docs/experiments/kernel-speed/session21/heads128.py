"""Session 21: per-query-head masks at 128-token blocks on every forward candidate the tuner has, the Hopper kernel's
per-group tile with one head a tile among them now; Llama-3.1-8B heads (32 / 8) and a multi-head model (32 / 32, as
Llama-2-7B), D 128, bf16, 32k, structured density masks of ``benchmarks.attention`` at 10 %.

    PYTHONPATH=src:. python3 docs/experiments/kernel-speed/session21/heads128.py --json runs/heads128.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.attention import bench, computed_pairs, synthetic_mask
from seerattn.ops._triton import sparse_fwd_ws
from seerattn.ops._triton.config import sparse_configs
from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    t, d, mb = args.seqlen, 128, 128
    rows = []
    for hq, hkv in ((32, 8), (32, 32)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for h in (hq, hkv, hkv))  # fmt: skip
        mask = synthetic_mask(hq, t, mb, 0.1, "structured", seed=1)
        flops = 4 * computed_pairs(mask, hq) * d
        hopper = sparse_fwd_ws.supported(q, k, v, mb, hq) is None
        for cfg in sparse_configs(mb, 1, d, hopper):

            def fn(cfg=cfg, q=q, k=k, v=v, mask=mask):
                block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, mb, d**-0.5,
                                           return_lse=False, config=cfg)  # fmt: skip

            ms = bench(fn, rep=args.rep)
            row = dict(heads=f"{hq}/{hkv}", config=cfg.short(), ms=ms, tflops=flops / ms / 1e9)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "seqlen": t, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
