"""Loading a model for evaluation, RoPE scaling beyond the training length, per-window scoring.

Shape legend: T tokens, V vocabulary, NB blocks.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..gate import GateConfig
from ..hf import SeerConfig, SeerState, apply_seer_attention, from_pretrained, get_seer_state, read_adapter_config
from ..hf.rope import ROPE_SCALINGS, rope_parameters, scaled_rope_config

__all__ = [
    "ROPE_SCALINGS",
    "EvalModel",
    "load_eval_model",
    "prepare_eval_model",
    "scaled_rope",
    "token_nll",
]

logger = logging.getLogger(__name__)

# Rows of hidden states sent through the LM head at once: the full [T, V] fp32 logits of a 16k
# window with a 32k vocabulary would be 2 GB.
_HEAD_CHUNK = 1024


@dataclass
class EvalModel:
    """A causal LM prepared for evaluation (seer attention attached, in eval mode).

    Attributes:
        model: the transformers model.
        state: its :class:`~seerattn.hf.SeerState`.
        gates: the adapter folder the gates came from (``None``: untrained, identity-initialised gates;
            methods that need gates refuse to run unless ``allow_untrained_gates``).
        train_length: context the model was trained at (RoPE scaling applies beyond it).
        name: what reports call the model.
    """

    model: torch.nn.Module
    state: SeerState
    gates: str | None
    train_length: int
    name: str = "model"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def block_size(self) -> int:
        return self.state.config.gate.block_size


def prepare_eval_model(
    model: torch.nn.Module,
    gates: str | Path | None = None,
    block_size: int = 64,
    impl: str | None = None,
    train_length: int | None = None,
    name: str = "model",
    mask_heads: str | None = None,
) -> EvalModel:
    """Attach seer attention (and an adapter's gates) to a loaded model; mode starts as ``dense``.

    Args:
        model: a transformers causal LM of a supported family.
        gates: adapter folder; ``None`` attaches untrained gates of ``block_size``.
        block_size: block size without an adapter (an adapter's own block size wins).
        impl: op implementation (``None``: Triton on CUDA, reference on CPU).
        train_length: training context; default ``model.config.max_position_embeddings``.
        mask_heads: ``"q"`` or ``"kv"`` overrides the adapter's ``SeerConfig.mask_heads`` (``None``: keep it).
    """
    model.eval()
    if gates is not None:
        if read_adapter_config(gates).get("prefill") is None:
            raise ValueError(
                f"adapter {gates} has no prefill section (decode gates only); the prefill evaluations need "
                "prefill gates (decode gates are evaluated by `seerattn eval decode`)"
            )
        # decode=None: the prefill evaluations measure prefill sparsity; an adapter's decode gates stay off, so
        # no generation inside them (e.g. passkey answers) runs sparse decode behind their back
        from_pretrained(model, gates, mode="dense", impl=impl, decode=None)
        state = get_seer_state(model)
    else:
        state = apply_seer_attention(model, SeerConfig(gate=GateConfig(block_size=block_size), mode="dense", impl=impl))
    if mask_heads is not None:
        state.set(mask_heads=mask_heads)  # validated by SeerConfig
    return eval_model(model, state, gates, train_length, name)


def eval_model(model, state: SeerState, gates, train_length: int | None, name: str) -> EvalModel:
    """The :class:`EvalModel` of a prepared model; ``train_length`` defaults to the config's
    ``max_position_embeddings`` (an error names the argument when the config has none)."""
    train_length = train_length or getattr(model.config, "max_position_embeddings", None)
    if not train_length:
        raise ValueError("pass train_length: the model config has no max_position_embeddings")
    return EvalModel(model, state, None if gates is None else str(gates), int(train_length), name)


def load_eval_model(
    path: str | Path,
    gates: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    block_size: int = 64,
    impl: str | None = None,
    train_length: int | None = None,
    mask_heads: str | None = None,
) -> EvalModel:
    """``AutoModelForCausalLM.from_pretrained(path)`` on ``device`` in ``dtype`` (default: fp32 on CPU,
    bf16 on CUDA), prepared with :func:`prepare_eval_model`."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    return prepare_eval_model(model, gates, block_size, impl, train_length, name=str(path), mask_heads=mask_heads)


# --------------------------------------------------------------------------------- RoPE scaling
# Attributes of a transformers rotary embedding module that define its frequencies.
_ROTARY_ATTRS = ("config", "rope_type", "attention_scaling", "max_seq_len_cached", "original_max_seq_len")
_ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


@contextlib.contextmanager
def scaled_rope(em: EvalModel, context: int, kind: str | None = "yarn") -> Iterator[dict | None]:
    """Within the block, RoPE of ``em`` is scaled for ``context`` tokens if that exceeds its training length.

    The model's shared rotary module is updated *in place* (same object, so the gates' RoPE, which
    calls it, scales too) from a copy of the config with ``rope_parameters`` set to
    ``{"rope_type": kind, "factor": context / train_length, ...}``; everything is restored on exit.

    Yields:
        ``None`` when no scaling applies, else the ``rope_parameters`` used (for reports).
    """
    if kind is None or context <= em.train_length:
        yield None
        return
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling must be one of {ROPE_SCALINGS} or None, got {kind!r}")
    base = getattr(em.model, "model", em.model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(em.model).__name__} has no shared rotary embedding (`.model.rotary_emb`) to scale")
    factor = context / em.train_length
    cfg = scaled_rope_config(em.model.config, kind, factor, em.train_length)
    fresh = type(rotary)(config=cfg)
    saved = {a: getattr(rotary, a) for a in _ROTARY_ATTRS if hasattr(rotary, a)}
    saved_buffers = {b: getattr(rotary, b) for b in _ROTARY_BUFFERS if hasattr(rotary, b)}
    try:
        for a in saved:
            setattr(rotary, a, getattr(fresh, a))
        for b, old in saved_buffers.items():
            setattr(rotary, b, getattr(fresh, b).to(device=old.device, dtype=old.dtype))
        logger.info("context %d > training length %d: RoPE %s x%.3g", context, em.train_length, kind, factor)
        yield rope_parameters(cfg)
    finally:
        for a, v in saved.items():
            setattr(rotary, a, v)
        for b, v in saved_buffers.items():
            setattr(rotary, b, v)


# ------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def token_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihoods of one window: fp64 [T - 1], entry t for token t + 1.

    ids: int64 [T] (or [1, T]). Token ``t + 1`` is predicted from tokens ``<= t``; the LM head runs in
    chunks and the cross-entropy in fp32 (as transformers' own loss does).
    """
    ids = ids.view(1, -1).to(next(model.parameters()).device)
    t = ids.shape[1]
    if t < 2:
        raise ValueError(f"a window needs at least 2 tokens, got {t}")
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # [1, T, H]
    head = model.get_output_embeddings()
    out = []
    for s in range(0, t - 1, _HEAD_CHUNK):
        e = min(s + _HEAD_CHUNK, t - 1)
        logits = head(hidden[:, s:e]).float()  # [1, e - s, V]
        out.append(F.cross_entropy(logits[0], ids[0, s + 1 : e + 1], reduction="none").double())
    return torch.cat(out).cpu()


@torch.no_grad()
def greedy_continue(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], float | None]:
    """Prefill ``ids`` (int64 [T]) once, then greedily decode ``max_new_tokens`` tokens with the KV cache.

    The prefill runs through the active seer mode; decode steps (one query, Tq != Tk) take the dense
    path, as in SeerAttention's prefill-only sparsity. Returns the new tokens and the mean realised
    block density of the prefill (``None`` without seer attention).
    """
    ids = ids.view(1, -1).to(next(model.parameters()).device)
    state = getattr(model, "_seer_state", None)
    # transformers 5 renamed the KV-cache argument and output ``past_key_values`` -> ``cache``
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    density = state.mean_density() if state is not None else None
    new: list[int] = []
    nxt = out.logits[:, -1].argmax(-1)
    for step in range(max_new_tokens):
        new.append(int(nxt))
        if step == max_new_tokens - 1:
            break
        out = model(input_ids=nxt.view(1, 1), use_cache=True, **{cache_kw: out[cache_kw]})
        nxt = out.logits[:, -1].argmax(-1)
    return new, density
