"""Session 21: a batch-broadcast K / V (stride 0 along the batch: ``k.expand(2, ...)``) on the Hopper forward. Its
TMA descriptors take the tensors' strides as they are; this says whether the driver accepts a zero stride and whether
the output then matches the fp32 reference (or what fails, with the error).

    PYTHONPATH=src:.:tests python3 docs/experiments/kernel-speed/session21/stride0.py
"""

from __future__ import annotations

import json

import torch
from kernel_helpers import rand_mask  # tests/ on PYTHONPATH

from seerattn.ops import reference
from seerattn.ops._triton import sparse_fwd_ws
from seerattn.ops._triton.config import KernelConfig
from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd


def main() -> None:
    b, hq, hkv, t, d = 2, 8, 2, 1000, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k1, v1 = (torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = k1.expand(b, -1, -1, -1), v1.expand(b, -1, -1, -1)
    mask = rand_mask(b, hkv, t, 64, density=0.3, seed=1).to("cuda")
    res = dict(k_stride=list(k.stride()), supported=sparse_fwd_ws.supported(q, k, v, 64, hkv))
    cfg = KernelConfig(128, 64, hq // hkv, 4, sparse_fwd_ws.STAGES, hopper_ws=True)
    try:
        out, _ = block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, 64, d**-0.5, None, True, cfg)
        torch.cuda.synchronize()
        ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask)
        res["max_abs_err"] = (out.float() - ref).abs().max().item()
        res["ref_max"] = ref.abs().max().item()
    except Exception as err:  # noqa: BLE001  (the failure is the finding: recorded, not raised)
        res["error"] = f"{type(err).__name__}: {str(err)[:400]}"
    print(json.dumps(res))


if __name__ == "__main__":
    main()
