"""Session 21: packed sequences (varlen) on every forward candidate the tuner has, the Hopper kernel's among them now:
the four prompts of the padded-batch prefill row (32768, 28672, 24576, 20480 tokens) packed back to back, Llama-3.1-8B
heads 32 / 8, D 128, bf16, structured density masks of ``benchmarks.attention`` at 10 %, per query head (block 64) and
per group (blocks 64 and 128); and the tuner's pick (impl "triton", a fresh tuning).

    PYTHONPATH=src:. python3 docs/experiments/kernel-speed/session21/varlen.py --json runs/varlen.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.attention import bench, synthetic_mask
from seerattn.ops._triton import sparse_fwd_ws
from seerattn.ops._triton.config import sparse_configs
from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lens", default="32768,28672,24576,20480")
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    lens = [int(x) for x in args.lens.split(",")]
    hq, hkv, d = 32, 8, 128
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, int(cu[-1]), h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for h in (hq, hkv, hkv))  # fmt: skip
    rows = []
    for heads, mb in ((hq, 64), (hkv, 64), (hkv, 128)):
        masks = [synthetic_mask(heads, max(lens), mb, 0.1, "structured", seed=1 + n) for n in range(len(lens))]
        num = torch.cat([m.kv_num_blocks for m in masks])
        idx = torch.cat([m.kv_indices for m in masks])
        hopper = sparse_fwd_ws.supported(q, k, v, mb, heads) is None
        for cfg in [*sparse_configs(mb, hq // heads, d, hopper), None]:

            def fn(cfg=cfg, num=num, idx=idx, mb=mb):
                block_sparse_attention_fwd(q, k, v, num, idx, mb, d**-0.5, cu_seqlens=cu, return_lse=False,
                                           config=cfg)  # fmt: skip

            ms = bench(fn, rep=args.rep)
            name = "tuned" if cfg is None else cfg.short()
            row = dict(mask_heads="hq" if heads == hq else "hkv", mask_block=mb, config=name, ms=ms)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "lens": lens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
