"""The one table of model shapes the benchmarks use.

``ATTENTION``: name -> (Hq, Hkv, D), for attention-only benchmarks.
``LLAMA_31_8B``: transformers ``LlamaConfig`` fields of Llama-3.1-8B (random weights: speed only);
whole-model benchmarks set ``num_hidden_layers`` to what fits.
"""

from __future__ import annotations

# name: (Hq, Hkv, D)
ATTENTION: dict[str, tuple[int, int, int]] = {
    "llama3.1-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
    "llama3.2-1b": (32, 8, 64),
}

LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)

# --smoke runs of the whole-model benchmarks: a tiny Llama on the CPU (it runs; times mean nothing)
SMOKE_SHAPE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16
)


def build_llama(shape: dict, device: str, dtype):
    """``LlamaForCausalLM`` of ``shape`` (``LlamaConfig`` fields) with random weights (seed 0) and SDPA
    attention, built directly on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)
