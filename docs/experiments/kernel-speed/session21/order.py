"""Session 21: the Hopper forward with the tile's metadata from the loader (shared memory instead of the math
warpgroups' list loads) in its static and dynamic tile orders, against the tree before (another process, same
script). Per-group masks at 64-token blocks (64- and 128-key steps) and 128-token blocks, all blocks kept and 10 %;
per-query-head masks at 10 % (32k and 128k); Llama-3.1-8B heads 32 / 8, D 128, bf16, structured density masks of
``benchmarks.attention``. Where the tree's ``launch`` takes ``dynamic``, the dynamic order is timed too and its
outputs compared with the static order's, bit for bit.

    PYTHONPATH=src:. python3 docs/experiments/kernel-speed/session21/order.py --tree new --json runs/order.json
"""

from __future__ import annotations

import argparse
import inspect
import json

import torch

from benchmarks.attention import bench, computed_pairs, synthetic_mask
from seerattn.ops._triton import sparse_fwd_ws
from seerattn.ops._triton.config import KernelConfig
from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd

CASES = (  # (T, mask heads, mask block, keys a step, density)
    (32768, "hkv", 64, 128, 1.0), (32768, "hkv", 128, 128, 1.0),
    (32768, "hkv", 64, 128, 0.1), (32768, "hkv", 64, 64, 0.1), (32768, "hkv", 128, 128, 0.1),
    (32768, "hq", 64, 64, 0.1), (131072, "hq", 64, 64, 0.1), (131072, "hkv", 64, 128, 0.1),
)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", required=True)
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    hq, hkv, d = 32, 8, 128
    launch = sparse_fwd_ws.launch
    orders = ["static", "dynamic"] if "dynamic" in inspect.signature(launch).parameters else ["static"]
    rows = []
    for t, mh, mb, bn, density in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for h in (hq, hkv, hkv))  # fmt: skip
        heads = hq if mh == "hq" else hkv
        mask = synthetic_mask(heads, t, mb, density, "structured", seed=1)
        flops = 4 * computed_pairs(mask, hq) * d
        per_head = heads == hq
        stages = sparse_fwd_ws.STAGES_HEADS if per_head else sparse_fwd_ws.stages(bn)
        cfg = KernelConfig(128, bn, 1 if per_head else hq // hkv, 4, stages, hopper_ws=True)
        outs = {}
        for order in orders:
            if order == "dynamic":
                sparse_fwd_ws.launch = lambda *a, **kw: launch(*a, dynamic=True, **kw)
            else:
                sparse_fwd_ws.launch = launch

            def fn(lse=False, q=q, k=k, v=v, mask=mask, mb=mb, cfg=cfg):
                return block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, mb, d**-0.5,
                                                  return_lse=lse, config=cfg)  # fmt: skip

            outs[order] = fn(True)
            ms = bench(fn, rep=args.rep)
            row = dict(tree=args.tree, order=order, seqlen=t, mask_heads=mh, mask_block=mb, block_n=bn,
                       density=density, ms=ms, tflops=flops / ms / 1e9)  # fmt: skip
            if order == "dynamic":
                (o_s, l_s), (o_d, l_d) = outs["static"], outs["dynamic"]
                row["same_as_static"] = bool(torch.equal(o_s, o_d) and torch.equal(l_s, l_d))
            rows.append(row)
            print(json.dumps(row), flush=True)
        sparse_fwd_ws.launch = launch
        del outs
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
