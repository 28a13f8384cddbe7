"""Session 26: the density selection and the gate's scores kernel timed on the tree on PYTHONPATH (the device script
runs it once per tree, alternating), so main and a branch are compared in one call.

    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/session26/select_ab.py --tag new --json new.json

Selection (``select_fwd``, kind ``density``, row budgets, sink and diagonal forced): B 1, H 32 per-query-head masks,
NQ 512 (32k tokens at block 64) and 2048 (128k), densities 0.1, 0.05 and 1.0 (the whole causal row: the threshold
search stops at once, so that row times the loads and stores alone), on gate-like logits (N(0, 3^2), -inf above the
diagonal, fixed seed). Each case's outputs are hashed (``kv_num_blocks`` and ``kv_indices``, padding included), so two
trees' rows say whether they select the same lists. Scores kernel (``gate_fwd._scores``, tf32x3, R 4, Dg 128, the
testbed gate's split inputs at Llama-3.1-8B heads): with and without ``causal_only`` where the tree has it. Times are
medians of ``triton.testing.do_bench_cudagraph`` (a CUDA graph of the one launch replayed).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json

import torch
import triton

from seerattn.block_mask import density_row_budget
from seerattn.ops._triton import gate_fwd
from seerattn.ops._triton.select import select_fwd


def logits(nq: int, heads: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = 3.0 * torch.randn(1, heads, nq, nq, generator=g)
    return s.masked_fill(torch.ones(nq, nq, dtype=torch.bool).triu(1), float("-inf")).to(device)


def split(x: torch.Tensor):
    """Gate vectors as the projection writes them split (see tests/test_gate_kernels.py::_split_vectors)."""
    e = torch.frexp(x.abs().amax(-1))[1] - 1
    v = x * torch.exp2(14 - e.float())[..., None]
    hi = v.half()
    return torch.cat([hi, (v - hi.float()).half()], -1).contiguous(), torch.exp2(e.float() - 14).contiguous()


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    for nq in (512, 2048):
        scores = logits(nq, 32, dev)
        for density in (0.1, 0.05, 1.0):
            budget = density_row_budget(nq, density, dev, "row")

            def fn(scores=scores, budget=budget, density=density):
                return select_fwd(scores, "density", density, budget, True, True, 0)

            num, idx = fn()
            digest = hashlib.sha1(num.cpu().numpy().tobytes() + idx.cpu().numpy().tobytes()).hexdigest()[:12]
            rows.append({"tag": args.tag, "part": "select", "nq": nq, "density": density, "ms": bench(fn),
                         "digest": digest})  # fmt: skip
        del scores
    has_flag = "causal_only" in inspect.signature(gate_fwd._scores).parameters
    for nb in (512, 2048):
        g = torch.Generator(device="cpu").manual_seed(1)
        qg = split(torch.randn(1, 32, 4 * nb, 128, generator=g).to(dev))
        kg = split(torch.randn(1, 32, nb, 128, generator=g).to(dev))
        for causal_only in (False, True) if has_flag else (False,):
            kw = {"causal_only": True} if causal_only else {}
            out = gate_fwd._scores(qg, kg, 4, "tf32x3", **kw)
            causal = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
            digest = hashlib.sha1(out[..., causal].cpu().numpy().tobytes()).hexdigest()[:12]
            ms = bench(lambda kw=kw, qg=qg, kg=kg: gate_fwd._scores(qg, kg, 4, "tf32x3", **kw))
            rows.append({"tag": args.tag, "part": "scores", "nq": nb, "causal_only": causal_only, "ms": ms,
                         "digest": digest})  # fmt: skip
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
