"""Which wip/fwd-hopper forward candidates compile, run and match the reference on this GPU, each alone in a process.

From a checkout of branch wip/fwd-hopper (PYTHONPATH=src): ``python3 probe.py list`` prints (block, index, config)
per candidate; ``timeout 25 python3 probe.py one BLOCK INDEX`` runs one (T 4173, Hq 8 / Hkv 2, D 128, bf16, every
causal block kept) and prints its first-call time and relative error against the fp32 reference."""

import sys
import time

import torch


def cands(bs):
    from seerattn.ops._triton.config import sparse_configs

    return sparse_configs(bs, 4, 128, True)


if sys.argv[1] == "list":
    for bs in (64, 128):
        for i, c in enumerate(cands(bs)):
            print(bs, i, c.short())
else:
    bs, i = int(sys.argv[2]), int(sys.argv[3])
    from seerattn.block_mask import BlockMask
    from seerattn.ops import reference
    from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd

    cfg = cands(bs)[i]
    torch.manual_seed(0)
    t, hq, hkv, d = 4096 + 77, 8, 2, 128
    q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    nb = -(-t // bs)
    # every causal block kept (a dense mask in list form): correctness against SDPA-free reference
    num = torch.arange(1, nb + 1, device="cuda", dtype=torch.int32).view(1, 1, nb).expand(1, hkv, nb).contiguous()
    idx = torch.arange(nb, device="cuda", dtype=torch.int32).view(1, 1, 1, nb).expand(1, hkv, nb, nb).contiguous()
    mask = BlockMask(num, idx, bs, t)
    t0 = time.time()
    out, _ = block_sparse_attention_fwd(q, k, v, num, idx, bs, d**-0.5, return_lse=False, config=cfg)
    torch.cuda.synchronize()
    t1 = time.time()
    ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"{bs} {i} {cfg.short()} ok first-call {t1 - t0:.1f}s rel.err {err:.2e}")
