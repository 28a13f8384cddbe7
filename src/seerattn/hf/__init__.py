"""Hugging Face integration: the only subpackage that imports transformers."""

from .integration import (
    FAMILIES,
    MaskRequest,
    SeerConfig,
    SeerState,
    apply_seer_attention,
    gate_logits,
    gate_modules,
    get_seer_state,
    group_scores,
    remove_seer_attention,
)

__all__ = [
    "FAMILIES",
    "MaskRequest",
    "SeerConfig",
    "SeerState",
    "apply_seer_attention",
    "gate_logits",
    "gate_modules",
    "get_seer_state",
    "group_scores",
    "remove_seer_attention",
]

from .adapter import (  # noqa: E402
    convert_official_checkpoint,
    from_pretrained,
    load_gates,
    read_adapter_config,
    save_gates,
)

__all__ += [
    "convert_official_checkpoint",
    "from_pretrained",
    "load_gates",
    "read_adapter_config",
    "save_gates",
]
