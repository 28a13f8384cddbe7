"""The split projection on the testbed's real gates and a real prompt, on the CPU: do the 22-bit operands change a
selection? (The interpreter runs the kernels' arithmetic in numpy: the fp16 halves are rounded as on the GPU, the
products and sums are exact fp32; the tensor cores' accumulation is the GPU tests' and ``gate_precision.py``'s.)

Every layer of the testbed (``testbed/model``, ``testbed/gates``) on the first test book window of
``data/books-sample`` (T tokens): the gate logits by the eager fp64 gate (the oracle), the eager fp32 gate and the
Triton gate under ``TRITON_INTERPRET=1`` at ``tf32x3`` (the split projection) and ``ieee`` (fp32 rows, one fp32
dot); relative L2 error of each against the oracle, and the (head, row) pairs whose 10 % selection (row allocation)
differs from the eager fp32 gate's.

    TRITON_INTERPRET=1 PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/session23/testbed_masks.py \
        --tokens 4096 --json docs/experiments/prefill-gate-policy/session23/testbed_masks.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from seerattn import SparsityPolicy, mask_from_scores
from seerattn.eval import TokenizedBooks, load_eval_model, segment_windows
from seerattn.hf import get_seer_state
from seerattn.hf.integration import _gate_forward
from seerattn.ops._triton import gate_fwd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--json")
    args = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("testbed/model")
    books = TokenizedBooks("data/books-sample", tok, split="test")
    ids = segment_windows(books, args.tokens, 1)[0][None]
    em = load_eval_model("testbed/model", gates="testbed/gates")
    model = em.model
    state = get_seer_state(model)
    state.capture = True
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    real = gate_fwd.gate_logits_fwd
    pol = SparsityPolicy("density", 0.1)
    rows = []
    for layer in sorted(state.captures):
        q_pre, k_pre = state.captures[layer][:2]
        b, t = ids.shape
        gate = state._attn_modules[layer].seer_gate
        hq, hkv = gate.num_q_heads, gate.num_kv_heads
        q = q_pre.reshape(b, t, hq, -1).transpose(1, 2)
        k = k_pre.reshape(b, t, hkv, -1).transpose(1, 2)
        with torch.no_grad():
            eager = _gate_forward(gate, state, q, k, None, impl="eager")
            oracle = _gate_forward(copy.deepcopy(gate).double(), state, q.double(), k.double(), None, impl="eager")
            got = {}
            for prec in ("tf32x3", "ieee"):
                gate_fwd.gate_logits_fwd = lambda *a, prec=prec: real(*a, precision=prec)
                try:
                    got[prec] = _gate_forward(gate, state, q, k, None, impl="triton")
                finally:
                    gate_fwd.gate_logits_fwd = real
        fin = torch.isfinite(oracle)
        base = mask_from_scores(eager, pol, t, 64)
        row = {"layer": layer, "eager_fp32_rel_err": rel(eager[fin], oracle[fin])}
        for prec, x in got.items():
            m = mask_from_scores(x, pol, t, 64)
            differ = (m.kv_indices != base.kv_indices).any(-1) | (m.kv_num_blocks != base.kv_num_blocks)
            row[f"{prec}_rel_err"] = rel(x[fin], oracle[fin])
            row[f"{prec}_rows_differ"] = int(differ.sum())
        row["rows"] = int(base.kv_num_blocks.numel())
        rows.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "rows": rows}, f, indent=1)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


if __name__ == "__main__":
    main()
