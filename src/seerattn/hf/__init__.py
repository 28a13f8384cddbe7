"""Hugging Face integration: the only subpackage that imports transformers."""

from .integration import (
    FAMILIES,
    DecodeConfig,
    DecodeRequest,
    DecodeSelection,
    MaskRequest,
    SeerConfig,
    SeerState,
    apply_seer_attention,
    decode_gate_modules,
    gate_logits,
    gate_modules,
    get_seer_state,
    group_scores,
    remove_seer_attention,
)

__all__ = [
    "FAMILIES",
    "DecodeConfig",
    "DecodeRequest",
    "DecodeSelection",
    "MaskRequest",
    "SeerConfig",
    "SeerState",
    "apply_seer_attention",
    "decode_gate_modules",
    "gate_logits",
    "gate_modules",
    "get_seer_state",
    "group_scores",
    "remove_seer_attention",
]

from .adapter import (  # noqa: E402
    config_from_adapter,
    convert_official_checkpoint,
    from_pretrained,
    load_gates,
    merge_adapters,
    read_adapter_config,
    save_gates,
    write_adapter,
)

__all__ += [
    "config_from_adapter",
    "convert_official_checkpoint",
    "from_pretrained",
    "load_gates",
    "merge_adapters",
    "read_adapter_config",
    "save_gates",
    "write_adapter",
]
