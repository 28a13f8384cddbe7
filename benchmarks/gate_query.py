"""Time of one layer's decode-gate query (``DecodeGate.decode_query``): the eager torch query against the Triton one
(:func:`seerattn.ops.gate_decode_query`), each launched eagerly and replayed from a CUDA graph.

The query runs once per layer in every sparse decode step; in a step replayed from a graph its small torch launches
(eager: ~11-17 with a RotaryTable, see docs/design.md) are the cost, not their work. Two rotaries: ``table``, the
:class:`~seerattn.gate.RotaryTable` a static cache's steps use (two gathers), and ``call``, an HF-style rotary
called in every step (``benchmarks.decode.rotary_fn``). Queries in bf16 (the model's), an fp32 gate (as
:func:`seerattn.hf.apply_seer_attention` attaches it), positions spread over the context. Timed with
``triton.testing.do_bench`` (median ms; ``benchmarks.decode.time_ms``).

    python -m benchmarks.gate_query --batches 16,64 --json runs/gate_query.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from seerattn.gate import DecodeGate, DecodeGateConfig
from seerattn.gate.decode_gate import RotaryTable

from .decode import rotary_fn, time_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="16,64", help="comma list of batch sizes")
    p.add_argument("--heads", type=int, default=8, help="KV heads (Llama-3.1-8B: 8)")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=32768, help="positions drawn below this")
    p.add_argument("--reps", type=int, default=200, help="do_bench repetition time (ms)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gate_query times CUDA kernels; no CUDA device is visible")
    dev = torch.device("cuda")
    gate = DecodeGate(args.q_heads, args.heads, args.head_dim, DecodeGateConfig()).to(dev)
    call = rotary_fn()
    rotaries = {"table": RotaryTable(call, args.context, gate.gate_dim, gate.q_proj.dtype, dev), "call": call}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        q = torch.randn(b, args.q_heads, args.head_dim, generator=gen).to(dev, torch.bfloat16)
        positions = torch.randint(0, args.context, (b,), generator=gen, dtype=torch.int32).to(dev)
        for rotary_name, rotary in rotaries.items():
            for impl in ("eager", "triton"):
                gate.query_impl = impl
                with torch.no_grad():
                    for graph in (False, True):
                        ms = time_ms(functools.partial(gate.decode_query, q, positions, rotary), True, args.reps, graph)
                        row = {"batch": b, "rotary": rotary_name, "impl": impl, "cuda_graph": graph, "ms": ms,
                               "q_heads": args.q_heads, "heads": args.heads, "head_dim": args.head_dim}  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
