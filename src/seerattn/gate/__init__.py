"""AttnGate modules and their distillation loss (plain PyTorch; no transformers, no triton)."""

from .attn_gate import POOLINGS, AttnGate, GateConfig, apply_rotary, pool_blocks
from .decode_gate import DecodeGate, DecodeGateConfig, straddle_logits
from .kcache import BlockBounds, GateKeyCache
from .loss import decode_gate_loss, decode_gate_metrics, gate_loss, gate_metrics

__all__ = [
    "POOLINGS",
    "AttnGate",
    "BlockBounds",
    "DecodeGate",
    "DecodeGateConfig",
    "GateConfig",
    "GateKeyCache",
    "apply_rotary",
    "decode_gate_loss",
    "decode_gate_metrics",
    "gate_loss",
    "gate_metrics",
    "pool_blocks",
    "straddle_logits",
]
