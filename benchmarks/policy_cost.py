"""Time of turning gate probabilities into a block mask (:func:`seerattn.mask_from_scores`) per layer.

The policy runs once per layer in every sparse prefill, next to the block-sparse kernel, so its cost
belongs in the prefill budget. Scores are random causal softmax rows ``[1, H, NB, NB]`` (H = KV heads
of the model: the sparse path ranks per GQA group by default); each policy is timed with
``triton.testing.do_bench`` (median ms).

    python -m benchmarks.policy_cost --seqlens 32768,131072 --heads 8 --json runs/policy.json
"""

from __future__ import annotations

import argparse
import functools

import torch

from seerattn import SparsityPolicy, mask_from_scores
from seerattn.block_mask import ALLOCATIONS
from seerattn.record import write_record

# every density allocation the library has, then the other kinds
POLICIES = {f"density/{a}": SparsityPolicy("density", 0.1, allocation=a) for a in ALLOCATIONS} | {
    "threshold": SparsityPolicy("threshold", 5e-3),
    "top_p": SparsityPolicy("top_p", 0.9),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", default="32768,131072", help="comma list of prompt lengths")
    p.add_argument("--heads", type=int, default=8, help="heads ranked (KV heads of Llama-3.1-8B: 8)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("policy_cost times CUDA policies; no CUDA device is visible")
    from triton.testing import do_bench

    rows = []
    for t in (int(x) for x in args.seqlens.split(",")):
        nb = -(-t // args.block_size)
        logits = torch.randn(1, args.heads, nb, nb, device="cuda")
        causal = torch.ones(nb, nb, dtype=torch.bool, device="cuda").tril()
        scores = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        for name, pol in POLICIES.items():
            call = functools.partial(mask_from_scores, scores, pol, t, args.block_size)
            ms = do_bench(call, warmup=5, rep=50)
            rows.append({"seq_len": t, "heads": args.heads, "policy": name, "ms": ms})
            print(f"T={t:>7} H={args.heads} {name:<16} {ms:8.3f} ms")
    if args.json:
        write_record(args.json, "bench-policy-cost", rows, vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
