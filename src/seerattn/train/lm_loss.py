"""The causal LM loss over token chunks: mean next-token cross-entropy without the ``[B, T, V]`` logits.

transformers' loss (``ForCausalLMLoss``) takes the whole logits tensor: at 32k tokens x Llama-3's 128256 words
that is 7.8 GiB in bf16, 15.7 GiB once cast to fp32, and its backward holds about three fp32 copies (47 GiB at
32k, 94 GiB at 64k; ``docs/design.md``, "Memory per GPU"): more than the rest of an 8B fine-tuning step.
:func:`causal_lm_loss` computes the same number from the final hidden states and the LM head's weight, one chunk
of ``chunk_tokens`` positions at a time, inside one ``torch.autograd.Function``:

- forward: per chunk, ``logits = hidden_chunk @ weight^T`` ``[c, V]`` in the compute dtype, cast to fp32 (as
  transformers does: bf16 logits under bf16 autocast, the log-sum-exp in fp32), the log-sum-exp and the target's
  logit; only the chunk's sum of losses and its ``[c]`` log-sum-exps are kept. Saved for the backward: the hidden
  states in the compute dtype ``[N, H]`` (what ``lm_head``'s own backward saves under autocast), the weight (the
  parameter itself, no copy) and the ``[N]`` log-sum-exps;
- backward: per chunk, the logits again, ``softmax - one_hot(target)`` in place, scaled by the incoming gradient
  (zero on ignored rows), then ``grad_hidden[chunk] = g @ weight`` and ``grad_weight += g^T @ hidden_chunk``
  (accumulated in fp32). The weight's gradient reaches whatever holds it: an untied ``lm_head``, or the embedding
  it is tied to (one Parameter), or FSDP2's unsharded root parameter.

Peak extra memory: about ``10 x chunk_tokens x V`` bytes in the forward (bf16 logits, their fp32 copy and the
log-sum-exp's temporary) and ``8 x chunk_tokens x V`` in the backward, plus one bf16 copy of the weight under
autocast; none of it grows with T. The price is a second LM-head matmul in the backward (2·N·H·V FLOP, ~0.06 s
at 32k on an H200).

Targets follow transformers exactly: ``labels`` shifted left by one (position t predicts ``labels[t + 1]``, the
last position of each row predicts nothing), ``ignore_index`` (-100) positions left out, mean over the others
(NaN when there are none, as ``F.cross_entropy``). The fine-tuning trainer passes ``labels = input_ids``: packed
rows are scored across document boundaries, as with transformers' loss.

Shape legend: B batch, T tokens, N = B·T, H hidden size, V vocabulary, c = chunk_tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss"]


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight^T`` against ``labels``, ``chunk_tokens`` positions at a time.

    Equal (within rounding) to ``ForCausalLMLoss(logits=F.linear(hidden, weight), labels=labels)`` and to its
    gradients, without ever holding more than ``[chunk_tokens, V]`` logits (module docstring).

    Args:
        hidden: ``[B, T, H]`` final hidden states (after the model's last norm).
        weight: ``[V, H]`` the LM head's weight (a bias-free linear layer: ``seerattn.hf.lm_head.linear_lm_head``).
        labels: ``[B, T]`` int64 token ids; ``ignore_index`` marks positions that are no target.
        chunk_tokens: positions per chunk (>= 1); any value gives the same loss.
        ignore_index: the label value left out of the loss (transformers': -100).

    Returns:
        A scalar: fp32 (fp64 for fp64 inputs). Under autocast the logits are computed in the autocast dtype and
        the log-sum-exp in fp32, as the full-logit path computes them.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    b, t, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [V, H] with H = {h} (hidden's last axis), got shape {tuple(weight.shape)}")
    if labels.shape != (b, t) or labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 of shape [B, T] = {(b, t)}, got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(
            f"hidden, weight and labels must share a device, got {hidden.device}, {weight.device}, {labels.device}"
        )
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    v = weight.shape[0]
    bad = valid & ((targets < 0) | (targets >= v))
    if bad.any():  # one host sync; F.cross_entropy refuses them too (on CUDA with a device-side assert)
        raise ValueError(
            f"labels hold {int(bad.sum())} id(s) outside the vocabulary [0, {v}) (e.g. {int(targets[bad][0])}) "
            f"that are not ignore_index ({ignore_index})"
        )
    total = _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(b * t, h), weight, targets, chunk_tokens, _compute_dtype(hidden, weight), ignore_index
    )
    return total / valid.sum()


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the LM head's matmul would run in: autocast's when it is on, else the (common) input dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype outside autocast, as for lm_head"
        )
    return hidden.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``logsumexp(x W^T) - (x W^T)[target]`` (rows with target ``ignore_index`` left out).

    ``hidden`` [N, H], ``weight`` [V, H], ``targets`` [N] -> scalar (module docstring: what is saved, what is
    recomputed). Runs with autocast off and casts explicitly, so that forward and backward use the same dtypes
    wherever the backward runs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, compute_dtype, ignore_index):
        loss_dtype = torch.promote_types(compute_dtype, torch.float32)
        n = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            x = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            lse = torch.empty(n, dtype=loss_dtype, device=hidden.device)
            total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
            for s in range(0, n, chunk_tokens):
                e = min(s + chunk_tokens, n)
                logits = F.linear(x[s:e], w).to(loss_dtype)  # [c, V]
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                tgt = targets[s:e]
                keep = tgt != ignore_index
                picked = logits.gather(1, tgt.masked_fill(~keep, 0).unsqueeze(1)).squeeze(1)
                total += torch.where(keep, lse[s:e] - picked, 0).sum()
                del logits
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.chunk_tokens, ctx.ignore_index, ctx.hidden_dtype = chunk_tokens, ignore_index, hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        x, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n, c = x.shape[0], ctx.chunk_tokens
        grad_hidden = torch.empty(x.shape, dtype=ctx.hidden_dtype, device=x.device) if need_hidden else None
        # fp32 accumulation over chunks (the weight's own dtype when wider, e.g. fp64)
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=x.device) if need_weight else None
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(x.dtype)
            for s in range(0, n, c):
                e = min(s + c, n)
                tgt = targets[s:e]
                keep = tgt != ctx.ignore_index
                g = F.linear(x[s:e], w).to(lse.dtype)  # [c, V] logits, then in place: d(loss)/d(logits)
                g.sub_(lse[s:e].unsqueeze(1)).exp_()  # softmax
                g.scatter_add_(1, tgt.masked_fill(~keep, 0).unsqueeze(1), -keep.to(g.dtype).unsqueeze(1))
                g.mul_((keep.to(g.dtype) * grad_total).unsqueeze(1))
                g = g.to(x.dtype)
                if need_hidden:
                    grad_hidden[s:e] = g @ w
                if need_weight:
                    grad_weight.add_(g.t() @ x[s:e])
                del g
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None
