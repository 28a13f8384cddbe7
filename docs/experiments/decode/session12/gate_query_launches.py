"""Kernel-like torch ops of one ``DecodeGate.decode_query`` call, eager against Triton, counted on the CPU with
torch.profiler (no GPU needed): the counts docs/design.md ("The gate query") quotes.

Llama-3.1-8B's head counts (Hq 32, Hkv 8; D 16 here: the counts do not depend on it), an fp32 gate, int32
positions (what the steps hand), q in fp16 (a non-fp32 model's queries: one cast in the eager path; the interpreter
refuses bf16) and fp32, Llama-3 RoPE called in the step or read from a :class:`~seerattn.gate.RotaryTable`. An op
in ``KERNELS`` counts as one launch (not descended into); ``aten::_fused_rms_norm`` is counted both as its CPU
composite and as one kernel (CUDA's fused RMSNorm). The Triton launch is replaced by a stub counted as one.

    TRITON_INTERPRET=1 PYTHONPATH=src:. python docs/experiments/decode/session12/gate_query_launches.py
"""

from __future__ import annotations

import collections

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import seerattn.ops._triton.gate_query as kernel
from seerattn.gate import DecodeGate, DecodeGateConfig
from seerattn.gate.decode_gate import RotaryTable

KERNELS = {
    "aten::copy_", "aten::bmm", "aten::mm", "aten::pow", "aten::mean", "aten::add_", "aten::rsqrt", "aten::mul",
    "aten::clone", "aten::cat", "aten::cos", "aten::sin", "aten::neg", "aten::add", "aten::index", "aten::sub",
    "aten::div", "aten::fill_", "aten::arange", "triton_kernel",
}  # fmt: skip


def stub(q, q_proj, norm_weight, eps, cos, sin):
    with torch.profiler.record_function("triton_kernel"):
        return torch.empty(q.shape[0], q_proj.shape[0], q_proj.shape[2], dtype=q_proj.dtype)


def count(event, counts: collections.Counter, fused_norm: bool) -> None:
    if event.name in KERNELS:
        counts[event.name] += 1
    elif fused_norm and event.name == "aten::_fused_rms_norm":
        counts["rms_norm (fused)"] += 1
    else:
        for child in event.cpu_children:
            count(child, counts, fused_norm)


def main() -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=32, num_key_value_heads=8, head_dim=16,
                      max_position_embeddings=131072, rope_parameters=rope)  # fmt: skip
    rotary = LlamaRotaryEmbedding(cfg)
    gate = DecodeGate(32, 8, 16, DecodeGateConfig(block_size=64))
    rotaries = {"rotary called": rotary, "RotaryTable": RotaryTable(rotary, 4096, 16, torch.float32, "cpu")}
    positions = torch.tensor([5, 100, 1000, 3000], dtype=torch.int32)
    kernel.gate_decode_query_fwd = stub
    for q_dtype in (torch.float16, torch.float32):
        q = torch.randn(4, 32, 16).to(q_dtype)
        for name, rot in rotaries.items():
            for impl in ("eager", "triton"):
                gate.query_impl = impl
                with torch.no_grad():
                    gate.decode_query(q, positions, rot)
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        gate.decode_query(q, positions, rot)
                for fused in (False, True):
                    counts = collections.Counter()
                    for e in prof.events():
                        if e.cpu_parent is None:
                            count(e, counts, fused)
                    print(f"q {str(q_dtype)[6:]:8s} {name:14s} {impl:6s} fused_norm={fused!s:5s} "
                          f"{sum(counts.values()):3d} {dict(counts)}")  # fmt: skip


if __name__ == "__main__":
    main()
