"""Session 27: the density selection fused into the gate's scores kernel (branch ``wip/fused-select``) against the
scores kernel (``causal_only``) and the selection kernel launched one after the other, in one process.

    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/session27/fused_ab.py --json r.json

Inputs: split gate vectors (as the projection writes them) at Llama-3.1-8B heads (32), Dg 128, R 4, NB 512 (32k)
and 2048 (128k); "wide": N(0, 1) vectors (logits spread ~1), "narrow": a shared vector plus 0.05 N(0, 1) (the
narrow rows fresh gates give, session 27 call 1). Density 0.1, row budgets, sink and diagonal forced. Times: medians
of ``do_bench_cudagraph`` (a CUDA graph of the launches replayed), two rounds alternating; outputs compared (the
causal logits, ``kv_num_blocks`` and ``kv_indices`` with padding, bit for bit).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from seerattn.block_mask import density_row_budget
from seerattn.ops._triton import gate_fwd
from seerattn.ops._triton.select import select_fwd


def split(x: torch.Tensor):
    """Gate vectors as the projection writes them split (see tests/test_gate_kernels.py::_split_vectors)."""
    e = torch.frexp(x.abs().amax(-1))[1] - 1
    v = x * torch.exp2(14 - e.float())[..., None]
    hi = v.half()
    return torch.cat([hi, (v - hi.float()).half()], -1).contiguous(), torch.exp2(e.float() - 14).contiguous()


def vectors(n: int, kind: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(1, 32, n, 128, generator=g)
    if kind == "narrow":
        x = torch.randn(1, 1, 1, 128, generator=g) + 0.05 * x
    return x


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    for nb in (512, 2048):
        budget = density_row_budget(nb, 0.1, dev, "row")
        causal = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
        for kind in ("wide", "narrow"):
            g = torch.Generator().manual_seed(0)
            qg = tuple(t.to(dev) for t in split(vectors(4 * nb, kind, g)))
            kg = tuple(t.to(dev) for t in split(vectors(nb, kind, g)))
            sel = (budget, True, True, 0)

            def separate(qg=qg, kg=kg, budget=budget):
                out = gate_fwd._scores(qg, kg, 4, "tf32x3", causal_only=True)
                return (out, *select_fwd(out, "density", 0.1, budget, True, True, 0))

            def fused(qg=qg, kg=kg, sel=sel):
                return gate_fwd._scores(qg, kg, 4, "tf32x3", causal_only=True, select=sel)

            a, b = separate(), fused()
            same = {
                "logits": torch.equal(a[0][..., causal], b[0][..., causal]),
                "num": torch.equal(a[1], b[1]),
                "idx": torch.equal(a[2], b[2]),
            }
            del a, b
            for rnd in (1, 2):
                for name, fn in (("separate", separate), ("fused", fused)):
                    ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
                    row = {"nb": nb, "kind": kind, "round": rnd, "variant": name, "ms": ms, **same}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
