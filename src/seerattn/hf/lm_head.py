"""The output head of a causal LM, for a loss computed from the hidden states (``seerattn.train.lm_loss``).

A loss that never holds the ``[B, T, V]`` logits takes the final hidden states and the head's weight instead of
calling the head; that is exact only where the head *is* one bias-free linear layer. In transformers 5, the
``ForCausalLM.forward`` of every family in :data:`LINEAR_HEAD_FAMILIES` computes ``logits =
self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))`` with ``lm_head = nn.Linear(hidden_size,
vocab_size, bias=False)`` (tied to the input embedding when ``tie_word_embeddings``) and passes the logits
unchanged to the loss: no final logit softcapping (Gemma 2/3), no logit scale (Cohere, Granite). Other families, and
a head replaced by a wrapper (a LoRA-adapted or quantised ``lm_head``), are refused, never approximated.

Shape legend: B batch, T tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

import torch

from .integration import _decoder_layers

__all__ = ["LINEAR_HEAD_FAMILIES", "final_hidden_states", "linear_lm_head"]

#: model types whose logits are exactly ``hidden @ lm_head.weight^T`` (read from each family's forward; the tests
#: check each against the model's own loss)
LINEAR_HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def linear_lm_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The ``lm_head`` of ``model`` after checking that the logits are ``hidden @ lm_head.weight^T`` and no more.

    Raises:
        ValueError: the family's head does more than a linear layer (or is not known to do no more), or
            ``lm_head`` is not a plain bias-free ``torch.nn.Linear`` (e.g. LoRA on ``lm_head``).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LINEAR_HEAD_FAMILIES:
        raise ValueError(
            f"the LM head of model family {model_type!r} is not known to be a plain linear layer (softcapped or "
            "scaled logits would make a loss from hidden @ lm_head.weight^T wrong); known to be: "
            f"{list(LINEAR_HEAD_FAMILIES)}"
        )
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        if type(head) is torch.nn.Linear:
            what = "a torch.nn.Linear with a bias"
        else:
            what = f"{type(head).__module__}.{type(head).__qualname__}"
        raise ValueError(
            f"{type(model).__name__}.lm_head is {what}; a loss from hidden @ lm_head.weight^T needs a plain bias-free "
            "torch.nn.Linear (not a LoRA-adapted or quantised head)"
        )
    return head


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder stack's output after its final norm, ``[B, T, H]``, for ``input_ids`` ``[B, T]``.

    Runs the causal LM's own forward (so that hooks on it run as for any forward: FSDP2 gathers the root unit,
    embeddings, final norm and LM head, there and keeps it gathered for the backward) with the LM head applied to
    the last position only (``logits_to_keep=1``), and takes the decoder stack's ``last_hidden_state`` from a
    forward hook.
    """
    base, _ = _decoder_layers(model)
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        captured.append(output.last_hidden_state)

    handle = base.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the decoder stack {type(base).__name__} ran {len(captured)} times in one forward")
    return captured[0]
