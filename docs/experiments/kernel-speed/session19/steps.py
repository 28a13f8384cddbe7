"""Session 19: the Hopper forward's key steps (64 keys = a kept block, 128 = two kept blocks or one 128-token block)
and the 128-key ring's depth, timed alone in alternating rounds (the long all-blocks rows drift between rows of one
run; alternating A / B / A / B puts both under the same drift). Per-group masks (Llama-3.1-8B heads 32 / 8, D 128,
bf16, 32k), structured density masks of ``benchmarks.attention``.

    PYTHONPATH=src:. python3 docs/experiments/kernel-speed/session19/steps.py --json runs/steps.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.attention import bench, computed_pairs, synthetic_mask
from seerattn.ops._triton import sparse_fwd_ws
from seerattn.ops._triton.config import KernelConfig
from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--densities", default="1.0,0.1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep", type=int, default=60)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    t, hq, hkv, d = args.seqlen, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for h in (hq, hkv, hkv))  # fmt: skip
    rows = []
    for density in (float(x) for x in args.densities.split(",")):
        for mb in (64, 128):
            mask = synthetic_mask(hkv, t, mb, density, "structured", seed=1)
            flops = 4 * computed_pairs(mask, hq) * d
            variants = [(bn, s) for (m, bn) in sparse_fwd_ws.STEPS if m == mb for s in ((4,) if bn == 64 else (2, 3))]
            for rnd in range(args.rounds):
                for bn, stages in variants:
                    sparse_fwd_ws.STAGES_PAIR = stages if bn == 128 else sparse_fwd_ws.STAGES_PAIR
                    st = stages if bn == 128 else sparse_fwd_ws.STAGES
                    cfg = KernelConfig(128, bn, 4, 4, st, hopper_ws=True)

                    def fn(cfg=cfg, mask=mask, mb=mb):
                        block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, mb, d**-0.5,
                                                   return_lse=False, config=cfg)  # fmt: skip

                    ms = bench(fn, rep=args.rep)
                    row = dict(density=density, mask_block=mb, block_n=bn, stages=stages, round=rnd, ms=ms,
                               tflops=flops / ms / 1e9)  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "seqlen": t, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
