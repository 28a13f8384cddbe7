"""Session 22: per-query-head masks at 64-token blocks (the model's path) on every forward candidate the tuner has,
the Hopper union kernel (two query blocks of one head a tile, the union of their lists copied once) among them;
Llama-3.1-8B heads (32 / 8), D 128, bf16, ``benchmarks.attention``'s structured and random density masks. Rounds
alternate over the candidates (the spread between rounds is the noise); each mask's union statistic: the K / V tiles
the union kernel copies over those the head-pair kernel copies (each list's blocks).

    PYTHONPATH=src:. python3 docs/experiments/kernel-speed/session22/union.py --json runs/union.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.attention import bench, computed_pairs, synthetic_mask
from seerattn.ops._triton import sparse_fwd_ws
from seerattn.ops._triton.config import sparse_configs
from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd


def union_share(mask) -> float:
    """Blocks of the union of each head's query-block pairs (2p, 2p + 1) over the blocks of their lists."""
    nq = mask.kv_num_blocks.shape[-1]
    dense = mask.to_dense()
    if nq % 2:
        dense = torch.cat([dense, torch.zeros_like(dense[..., :1, :])], -2)
    pairs = dense.view(*dense.shape[:-2], -1, 2, dense.shape[-1])
    return float(pairs.any(-2).sum() / pairs.sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="32768")
    p.add_argument("--densities", default="0.1,0.05")
    p.add_argument("--kinds", default="structured,random")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    hq, hkv, d, mb = 32, 8, 128, 64
    rows = []
    for t in (int(x) for x in args.seqlens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for h in (hq, hkv, hkv))  # fmt: skip
        hopper = sparse_fwd_ws.supported(q, k, v, mb, hq) is None
        cands = sparse_configs(mb, 1, d, hopper)
        for density in (float(x) for x in args.densities.split(",")):
            for kind in args.kinds.split(","):
                mask = synthetic_mask(hq, t, mb, density, kind, seed=1)
                flops = 4 * computed_pairs(mask, hq) * d
                share = union_share(mask)
                print(f"T={t} density={density} {kind}: union copies {share:.3f} of the pair's tiles", flush=True)
                for rnd in range(args.rounds):
                    for cfg in cands:

                        def fn(cfg=cfg, mask=mask, q=q, k=k, v=v):
                            block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, mb, d**-0.5,
                                                       return_lse=False, config=cfg)  # fmt: skip

                        ms = bench(fn, rep=args.rep)
                        row = dict(seqlen=t, density=density, kind=kind, round=rnd, config=cfg.short(), ms=ms,
                                   tflops=flops / ms / 1e9, union_share=share)  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
