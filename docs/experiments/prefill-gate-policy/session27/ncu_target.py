"""Session 27: one layer's gate (testbed windowed gate, causal_only) and density selection at 32k, Llama-3.1-8B heads,
bf16 q / k: the launches that call3.sh profiles with Nsight Compute (run twice: the first call compiles and splits
the weights, the second is profiled)."""

from __future__ import annotations

import sys

import torch

from benchmarks.gate_parts import GATES, case
from seerattn.block_mask import density_row_budget
from seerattn.ops._triton.select import select_fwd

t = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
gate, q, k, cos, sin = case(t, 32, 8, GATES["testbed"])
nb = t // 64
budget = density_row_budget(nb, 0.1, q.device, "row")
with torch.no_grad():
    for _ in range(2):
        logits = gate(q, k, cos, sin, impl="triton", causal_only=True)
        select_fwd(logits, "density", 0.1, budget, True, True, 0)
torch.cuda.synchronize()
