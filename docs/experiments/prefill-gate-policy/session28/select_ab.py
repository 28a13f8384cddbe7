"""Session 28: the density selection timed on the tree on PYTHONPATH (the device script runs it once per tree,
alternating), on three kinds of rows, so that main and a branch are compared in one call.

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session28/select_ab.py --tag new --json new.json

``select_fwd`` (kind ``density``, row budgets, sink and diagonal forced), B 1, H 32 per-query-head masks, NQ 512 (32k
tokens at block 64) and 2048 (128k), densities 0.1, 0.05 and 1.0 (whole rows: no search), on

- ``wide``: N(0, 3^2) logits, -inf above the diagonal (session 26's input; rows that mix signs: the hardest case for a
  search that starts at a row's common bits);
- ``narrow``: 1.387 + 0.03 N(0, 1), the fresh gates' rows in the benchmark's model (session 27, call 1: mean 1.387,
  standard deviation 0.025-0.041 a layer);
- ``gate``: the logits of a fresh testbed-architecture gate (``benchmarks.gate_parts.case``, Llama-3.1-8B heads, bf16
  random q / k), ``causal_only`` as the sparse path asks for them.

Each case's lists are hashed (``kv_num_blocks`` and ``kv_indices``, padding included), so two trees' rows say whether
they select the same blocks. Times: medians of ``triton.testing.do_bench_cudagraph`` (the launch replayed in a graph).
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
import triton

from seerattn.block_mask import density_row_budget
from seerattn.ops._triton.select import select_fwd


def rows_of(kind: str, nq: int, dev) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    if kind == "gate":
        from benchmarks.gate_parts import GATES, case

        gate, q, k, cos, sin = case(nq * 64, 32, 8, GATES["testbed"])
        with torch.no_grad():
            return gate(q, k, cos, sin, impl="triton", causal_only=True)
    noise = torch.randn(1, 32, nq, nq, generator=g)
    s = 3.0 * noise if kind == "wide" else 1.387 + 0.03 * noise
    return s.masked_fill(torch.ones(nq, nq, dtype=torch.bool).triu(1), float("-inf")).to(dev)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    for nq in (512, 2048):
        for kind in ("wide", "narrow", "gate"):
            scores = rows_of(kind, nq, dev)
            for density in (0.1, 0.05, 1.0):
                budget = density_row_budget(nq, density, dev, "row")

                def fn(scores=scores, budget=budget, density=density):
                    return select_fwd(scores, "density", density, budget, True, True, 0)

                num, idx = fn()
                digest = hashlib.sha1(num.cpu().numpy().tobytes() + idx.cpu().numpy().tobytes()).hexdigest()[:12]
                ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
                row = {"tag": args.tag, "part": "select", "rows": kind, "nq": nq, "density": density, "ms": ms,
                       "digest": digest}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
            del scores
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
