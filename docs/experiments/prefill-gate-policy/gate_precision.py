"""The fused gate's scores-kernel precision on the GPU: time per layer and error, per ``input_precision``.

    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/gate_precision.py --json runs/gate_precision.json

Time: the whole fused gate (pooling, projection, scores) of one layer, Llama-3.1-8B heads (Hq 32, Hkv 8,
D 128), the testbed's ``windows`` gate (Q windows of 16 pooled avg/max/min, K blocks of 64), random bf16
q/k and random gate weights, ``triton.testing.do_bench`` median, at 32k and 128k. Error: 8 query heads at
32k (the GPU test's case), each precision's logits against the fp64 eager gate (relative L2 over finite
entries) beside the eager fp32 gate's, and the share of (head, row) whose kept blocks at density 0.1
(``mask_from_scores`` on the softmax) differ from those of the eager fp32 gate.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from triton.testing import do_bench

from seerattn import SparsityPolicy, mask_from_scores
from seerattn.gate import AttnGate, GateConfig
from seerattn.ops._triton import gate_fwd

CFG = GateConfig(q_pooling=("avg", "max", "min"), q_subblock=16)


def rope(positions: torch.Tensor, dim: int):
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = positions.double()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos()[None].cuda(), emb.sin()[None].cuda()


def case(hq: int, hkv: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = AttnGate(hq, hkv, 128, CFG)
    with torch.no_grad():
        gate.k_proj.copy_(torch.randn(gate.k_proj.shape, generator=g) / 128**0.5)
        gate.q_proj.copy_(torch.randn(gate.q_proj.shape, generator=g) / 128**0.5)
    q = torch.randn(1, t, hq, 128, generator=g).to(torch.bfloat16).transpose(1, 2).cuda()
    k = torch.randn(1, t, hkv, 128, generator=g).to(torch.bfloat16).transpose(1, 2).cuda()
    cos, sin = rope(torch.arange(-(-t // CFG.q_step)) * CFG.q_step, gate.gate_dim)
    return gate.cuda(), q, k, cos, sin


def with_precision(precision: str):
    """The gate's Triton path with the scores kernel at ``precision`` (gate_ops imports it at each call)."""
    return functools.partial(_REAL, precision=precision)


_REAL = gate_fwd.gate_logits_fwd


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def kept(logits: torch.Tensor, t: int) -> torch.Tensor:
    mask = mask_from_scores(logits.softmax(-1), SparsityPolicy("density", 0.1), t, 64)
    return mask.to_dense()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    args = p.parse_args()
    rows = []
    with torch.no_grad():
        for t in (32768, 131072):
            gate, q, k, cos, sin = case(32, 8, t)
            c32, s32 = cos.float(), sin.float()
            for prec in gate_fwd.PRECISIONS:
                gate_fwd.gate_logits_fwd = with_precision(prec)
                run = functools.partial(gate, q, k, c32, s32, impl="triton")
                ms = do_bench(run, warmup=5, rep=50, return_mode="median")
                rows.append({"t": t, "precision": prec, "gate_ms": ms})
                print(rows[-1], flush=True)
            gate_fwd.gate_logits_fwd = _REAL
            del gate, q, k
        t = 32768
        gate, q, k, cos, sin = case(8, 2, t, seed=1)
        c32, s32 = cos.float(), sin.float()
        eager = gate(q, k, c32, s32, impl="eager")
        oracle = gate.double()(q.double(), k.double(), cos, sin, impl="eager")
        gate.float()
        fin = torch.isfinite(oracle)
        base = kept(eager, t)
        for prec in gate_fwd.PRECISIONS:
            gate_fwd.gate_logits_fwd = with_precision(prec)
            got = gate(q, k, c32, s32, impl="triton")
            gate_fwd.gate_logits_fwd = _REAL
            rows_differ = (kept(got, t) != base).any(-1).double().mean().item()
            rows.append(
                {"t": t, "heads": 8, "precision": prec, "rel_err": rel(got[fin], oracle[fin]),
                 "eager_fp32_rel_err": rel(eager[fin], oracle[fin]), "rows_with_other_blocks": rows_differ}
            )  # fmt: skip
            print(rows[-1], flush=True)
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
