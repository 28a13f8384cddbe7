"""RoPE scaling (YaRN, dynamic NTK, linear) through a transformers model's own config.

One place for what evaluation (RoPE scaled beyond the training length for one forward) and
fine-tuning (a model extended with YaRN for good) both need:

- :func:`rope_parameters`: the config's RoPE parameters in transformers-5 form;
- :func:`scaled_rope_config`: a copy of a config with ``rope_type``/``factor``/
  ``original_max_position_embeddings`` set (refusing to stack a scaling on a scaled model);
- :func:`apply_rope_scaling`: scale a loaded model in place (its config and its shared rotary
  module, which the gates' block RoPE also calls, so they follow).
"""

from __future__ import annotations

import copy
import logging

import torch

__all__ = ["ROPE_SCALINGS", "apply_rope_scaling", "rope_parameters", "scaled_rope_config"]

logger = logging.getLogger(__name__)

ROPE_SCALINGS = ("yarn", "dynamic", "linear")


def rope_parameters(config) -> dict:
    """The config's RoPE parameters in transformers-5 form (``rope_type``, ``rope_theta``, ...)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_type" in params:
        return dict(params)
    # transformers 4.x: ``rope_scaling`` (None for plain RoPE) and a separate ``rope_theta``.
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return scaling


def scaled_rope_config(config, kind: str, factor: float, train_length: int):
    """A deep copy of ``config`` whose RoPE is ``kind`` scaled by ``factor`` from ``train_length`` tokens.

    YaRN also sets ``max_position_embeddings = train_length * factor`` (the new context; a model
    saved with this config then needs no further scaling up to that length); dynamic NTK and linear
    read the original length from ``max_position_embeddings``, which is set to ``train_length``.
    """
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling must be one of {ROPE_SCALINGS}, got {kind!r}")
    if not factor > 1.0:
        raise ValueError(f"the RoPE scaling factor must be > 1, got {factor}")
    base = rope_parameters(config)
    if base["rope_type"] != "default":
        raise ValueError(
            f"the model already uses rope_type {base['rope_type']!r}; stacking {kind!r} scaling on it is not "
            "supported. Evaluate within the model's max_position_embeddings or pass rope_scaling=None"
        )
    cfg = copy.deepcopy(config)
    params = {"rope_type": kind, "rope_theta": base["rope_theta"], "factor": float(factor)}
    if kind == "yarn":
        params["original_max_position_embeddings"] = int(train_length)
        cfg.max_position_embeddings = int(round(train_length * factor))
    else:
        cfg.max_position_embeddings = int(train_length)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = params
    else:  # transformers 4.x
        theta = params.pop("rope_theta")
        cfg.rope_scaling, cfg.rope_theta = params, theta
    return cfg


def apply_rope_scaling(model: torch.nn.Module, kind: str, factor: float, train_length: int) -> dict:
    """Scale the RoPE of a loaded causal LM in place, as if it had been loaded with the scaled config.

    ``model.config`` gets the scaled RoPE parameters and ``max_position_embeddings``; the shared
    rotary module (``model.model.rotary_emb``) is rebuilt from it on the same device. Call it
    before :func:`~seerattn.hf.apply_seer_attention`, which captures the rotary module for the gates.

    Returns:
        the new ``rope_parameters`` (for records).
    """
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no shared rotary embedding (`.model.rotary_emb`) to scale")
    cfg = scaled_rope_config(model.config, kind, factor, train_length)
    # Copy the new fields onto the live config object: the attention modules and the rotary
    # module's own reference share it, and save_pretrained writes it.
    model.config.max_position_embeddings = cfg.max_position_embeddings
    if hasattr(cfg, "rope_parameters"):
        model.config.rope_parameters = cfg.rope_parameters
    else:
        model.config.rope_scaling, model.config.rope_theta = cfg.rope_scaling, cfg.rope_theta
    buf = next(iter(rotary.buffers()), None)
    fresh = type(rotary)(config=model.config)
    if buf is not None:
        fresh.to(buf.device)
    base.rotary_emb = fresh
    params = rope_parameters(model.config)
    logger.info("RoPE scaled in the model config: %s", params)
    return params
