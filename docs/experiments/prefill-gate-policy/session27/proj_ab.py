"""Session 27: the gate's projection (K's and Q's jobs in one launch) and the whole gate, timed on the tree on
PYTHONPATH; on branch ``wip/proj-persistent`` also at each ``--ppsm`` (``gate_fwd.PROJ_PROGRAMS_PER_SM``: a persistent
grid of that many programs a multiprocessor walking the tiles in one flattened loop; 0: a program a tile).

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session27/proj_ab.py --tag new --ppsm 2,0

Llama-3.1-8B heads, the testbed's windowed gate (``benchmarks.gate_parts.case``), bf16 q / k, 32k and 128k. Times:
medians of ``do_bench_cudagraph``; outputs hashed (the gate vectors' halves and scales; the causal logits), so the
trees' rows say whether they compute the same bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
import triton

from benchmarks.gate_parts import GATES, case
from seerattn.ops._triton import gate_fwd


def digest(*ts: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in ts:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--ppsm", default="", help="comma list of PROJ_PROGRAMS_PER_SM values (the branch only)")
    args = p.parse_args()
    variants = [int(x) for x in args.ppsm.split(",") if x] or [None]
    for t in (32768, 131072):
        run(t, variants, args.tag)


def run(t: int, variants: list, tag: str) -> None:
    cfg = GATES["testbed"]
    gate, q, k, cos, sin = case(t, 32, 8, cfg)
    qp = gate_fwd._pool(q, cfg.q_step, cfg.q_pooling, gate_fwd.POOL_PAIR_TILE[1:], True)
    kp = gate_fwd._pool(k, cfg.block_size, cfg.k_pooling, gate_fwd.POOL_PAIR_TILE[::2], True)
    wq, wk = gate.q_proj.detach(), gate.k_proj.detach()
    r = cfg.block_size // cfg.q_step
    nb = -(-t // cfg.block_size)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()

    def proj():
        return gate_fwd._project(kp, wk, cos, sin, r, "tf32x3", second=(qp, wq, 1))

    def whole():
        with torch.no_grad():
            return gate(q, k, cos, sin, impl="triton", causal_only=True)

    for v in variants:
        if v is not None:
            gate_fwd.PROJ_PROGRAMS_PER_SM = v
        (kg, kinv), (qg, qinv) = proj()
        d_proj = digest(kg, kinv, qg, qinv)
        d_gate = digest(whole()[..., causal])
        for part, fn, d in (("proj", proj, d_proj), ("gate", whole, d_gate)):
            ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
            print(json.dumps({"tag": tag, "ppsm": v, "t": t, "part": part, "ms": ms, "digest": d}), flush=True)


if __name__ == "__main__":
    main()
