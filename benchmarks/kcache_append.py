"""Time of one layer's decode-gate key-cache append (``GateKeyCache.append``): the eager torch append against the
Triton one (:func:`seerattn.ops.gate_key_append`), each launched eagerly and replayed from a CUDA graph.

The append runs once per layer in every sparse decode step; in a step replayed from a graph its ~38 small torch
launches (eager) are the cost, not their work. Each replay advances the device counters by one token, so a run of
replays completes a block every ``block_size`` of them, as decoding does (the slot clamps at the capacity once the
counters pass it: the same work). Both include the rotary call for the block starts (``benchmarks.decode``'s
HF-style rotary). Timed with ``triton.testing.do_bench`` (median ms; ``benchmarks.decode.time_ms``).

    python -m benchmarks.kcache_append --batches 16,64 --json runs/kcache_append.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from seerattn.gate import DecodeGate, DecodeGateConfig, GateKeyCache

from .decode import rotary_fn, time_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="16,64", help="comma list of batch sizes")
    p.add_argument("--heads", type=int, default=8, help="KV heads (Llama-3.1-8B: 8)")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--context", type=int, default=32768, help="prompt tokens already in the cache")
    p.add_argument("--reps", type=int, default=200, help="do_bench repetition time (ms)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kcache_append times CUDA kernels; no CUDA device is visible")
    rotary = rotary_fn()
    # fp32 gate (as seerattn.hf.apply_seer_attention attaches it), bf16 K rows (the model's)
    gate = DecodeGate(args.q_heads, args.heads, args.head_dim, DecodeGateConfig(block_size=args.block_size)).cuda()
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        k = torch.randn(b, args.heads, args.context, args.head_dim, device="cuda", dtype=torch.bfloat16)
        k_new = torch.randn(b, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
        for impl in ("eager", "triton"):
            cache = GateKeyCache(gate, b, max_tokens=args.context + 4096, device="cuda", impl=impl)
            cache.prefill(k, rotary=rotary)
            step = cache._append_eager if impl == "eager" else cache._append_triton  # the part a graph holds
            with torch.no_grad():
                for graph in (False, True):
                    ms = time_ms(functools.partial(step, k_new, rotary), True, args.reps, graph=graph)
                    row = {"batch": b, "impl": impl, "cuda_graph": graph, "ms": ms, "heads": args.heads,
                           "head_dim": args.head_dim, "block_size": args.block_size}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
