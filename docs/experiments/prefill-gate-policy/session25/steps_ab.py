"""Session 25: two steps a loop iteration in the split projection and the scores kernel (products of one step issued
before the other's sums), against one, at several pipeline depths; outputs compared bit for bit. Llama-3.1-8B heads,
the testbed's gate, bf16 q / k (benchmarks.gate_parts' case), do_bench medians, ms.

    git checkout 000b329   # the tree it ran on (call 4): ``_project`` / ``_scores`` with a ``steps`` argument
    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session25/steps_ab.py --json runs/steps.json

The projection went back to one step an iteration afterwards (742869b), so this script needs that tree.
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.decode import time_ms
from benchmarks.gate_parts import GATES, case
from seerattn.ops._triton import gate_fwd
from seerattn.record import write_record


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="32768,131072")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    cfg = GATES["testbed"]
    rows = []
    bench = functools.partial(time_ms, cuda=True, reps=100)
    for t in (int(x) for x in args.seqlens.split(",")):
        gate, q, k, cos, sin = case(t, 32, 8, cfg)
        wk, wq = gate.k_proj.detach(), gate.q_proj.detach()
        kw, qw, warps = gate_fwd.POOL_PAIR_TILE
        kp, qp = gate_fwd._pool(k, 64, cfg.k_pooling, (kw, warps), True, second=(q, 16, cfg.q_pooling, qw, True))
        r = 4
        ref_p = gate_fwd._project(kp, wk, cos, sin, r, "tf32x3", second=(qp, wq, 1), steps=1)
        proj = {}
        for steps, stages in ((1, 3), (2, 3), (2, 2), (1, 2)):
            tile = (64, 32, 4, stages)
            out = gate_fwd._project(kp, wk, cos, sin, r, "tf32x3", tile, second=(qp, wq, 1), steps=steps)
            same = all(torch.equal(a, b) for x, y in zip(out, ref_p, strict=True) for a, b in zip(x, y, strict=True))
            proj[(steps, stages)] = functools.partial(gate_fwd._project, kp, wk, cos, sin, r, "tf32x3", tile,
                                                      second=(qp, wq, 1), steps=steps)  # fmt: skip
            print(f"T={t} proj steps={steps} stages={stages} same bits as steps=1: {same}")
            rows.append({"seq_len": t, "part": "proj_same", "steps": steps, "stages": stages, "same": same})
        kg, qg = ref_p
        ref_s = gate_fwd._scores(qg, kg, r, "tf32x3", steps=1)
        scores = {}
        for steps, stages in ((1, 2), (2, 2), (2, 1)):
            tile = (64, 64, 4, stages)
            out = gate_fwd._scores(qg, kg, r, "tf32x3", tile, steps=steps)
            same = torch.equal(out, ref_s)
            scores[(steps, stages)] = functools.partial(gate_fwd._scores, qg, kg, r, "tf32x3", tile, steps=steps)
            print(f"T={t} scores steps={steps} stages={stages} same bits as steps=1: {same}")
            rows.append({"seq_len": t, "part": "scores_same", "steps": steps, "stages": stages, "same": same})
        for rnd in range(args.rounds):
            for name, fns in (("proj", proj), ("scores", scores)):
                for (steps, stages), fn in fns.items():
                    ms = bench(fn)
                    print(f"T={t} round {rnd} {name:<6} steps={steps} stages={stages} {ms:.4f} ms")
                    rows.append({"seq_len": t, "part": name, "steps": steps, "stages": stages, "round": rnd, "ms": ms})
        torch.cuda.empty_cache()
    if args.json:
        write_record(args.json, "bench-gate-steps", rows, vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
