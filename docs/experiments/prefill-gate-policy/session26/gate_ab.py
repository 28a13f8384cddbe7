"""Session 26, call 4: the whole gate (``AttnGate``, ``impl="triton"``, the testbed's windowed gate, Llama-3.1-8B
heads, bf16 q / k as the model hands them: ``benchmarks.gate_parts.case``) at 32k and 128k on the tree on PYTHONPATH,
its causal logits hashed, the median of a replayed CUDA graph (``triton.testing.do_bench_cudagraph``). The device
script runs it once per tree, alternating.

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session26/gate_ab.py --tag new
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
import triton

from benchmarks.gate_parts import GATES, case


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    args = p.parse_args()
    for t in (32768, 131072):
        gate, q, k, cos, sin = case(t, 32, 8, GATES["testbed"])
        with torch.no_grad():
            out = gate(q, k, cos, sin, impl="triton", causal_only=True)
            nb = out.shape[-1]
            causal = torch.ones(nb, nb, dtype=torch.bool, device=out.device).tril()
            digest = hashlib.sha1(out[..., causal].cpu().numpy().tobytes()).hexdigest()[:12]
            del out

            def fn(gate=gate, q=q, k=k, cos=cos, sin=sin):
                return gate(q, k, cos, sin, impl="triton", causal_only=True)

            ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
        print(json.dumps({"tag": args.tag, "part": "gate", "nq": nb, "ms": ms, "digest": digest}), flush=True)
        del gate, q, k


if __name__ == "__main__":
    main()
