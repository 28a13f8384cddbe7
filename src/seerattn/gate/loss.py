"""Distillation losses and quality metrics of the gates against their ground truth.

Prefill gate (:func:`gate_loss`, :func:`gate_metrics`): ``logits`` and ``target`` are ``[B, H, NB, NB]``
block maps. Decode gate (:func:`decode_gate_loss`, :func:`decode_gate_metrics`): ``[B, Hkv, T, NB]``,
one row per token taken as a decode query (:meth:`~seerattn.gate.DecodeGate.forward` and
:func:`~seerattn.ops.reference.decode_block_scores`), ``-inf`` logits on the blocks the gate does not
score (the current block and later ones).

Shape legend: B batch, H query heads, Hkv KV heads, T tokens, NB blocks.
"""

from __future__ import annotations

import torch

from ..block_mask import SparsityPolicy, mask_from_scores

__all__ = ["decode_gate_loss", "decode_gate_metrics", "gate_loss", "gate_metrics"]


def _causal(nb: int, device) -> torch.Tensor:
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def _kl_rows(log_q: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``sum_J t log(t / q)`` per row over the ``valid`` entries, ``0 log 0 = 0``; masked entries of
    ``log_q`` (``-inf``, or NaN in a row with nothing valid) are replaced before use, never multiplied."""
    t = target.float()
    valid = valid & (t > 0)
    kl = torch.where(valid, t * (torch.log(t.clamp_min(1e-30)) - log_q.masked_fill(~valid, 0.0)), 0.0)
    return kl.sum(-1)


def gate_loss(logits: torch.Tensor, target: torch.Tensor, skip_first_rows: int = 0) -> torch.Tensor:
    """KL(target || softmax(logits)) per block row, averaged over (batch, head, row).

    Args:
        logits: [B, H, NB, NB] gate logits (entries above the diagonal are ignored).
        target: [B, H, NB, NB] ground truth, rows summing to 1, zero above the diagonal.
        skip_first_rows: leave out the first query-block rows (the paper drops the first quarter
            "for stability": those rows have few choices and dominate nothing).

    Returns:
        scalar fp32: ``sum_J t log(t / q)`` per row, with ``0 log 0 = 0`` and entries above the
        diagonal masked out explicitly (never ``0 * -inf``), mean over the kept rows.
    """
    if logits.shape != target.shape or logits.dim() != 4 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            f"gate_loss needs logits and target of one shape [B, H, NB, NB], got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    nb = logits.shape[-1]
    if not 0 <= skip_first_rows < nb:
        raise ValueError(f"skip_first_rows must be in [0, NB={nb}), got {skip_first_rows}")
    causal = _causal(nb, logits.device)
    log_q = torch.log_softmax(logits.float().masked_fill(~causal, float("-inf")), dim=-1)
    return _kl_rows(log_q, target, causal)[..., skip_first_rows:].mean()


@torch.no_grad()
def gate_metrics(probs: torch.Tensor, target: torch.Tensor, density: float, seq_len: int, block_size: int) -> dict:
    """How well a gate's top blocks cover the true attention at a given density.

    Both the gate and the ground truth select ``round(density * n)`` blocks per row (no forced
    blocks), as :class:`~seerattn.SparsityPolicy` ``"density"`` does.

    Returns:
        ``block_recall``: fraction of the ground truth's top blocks that the gate also keeps;
        ``mass_recall``: mean over rows of the ground-truth mass inside the gate's kept blocks
        (1.0 = nothing of the max-pooled attention map is lost).
    """
    policy = SparsityPolicy("density", density, keep_sink=False, keep_diagonal=False)
    pred = mask_from_scores(probs, policy, seq_len, block_size).to_dense()
    true = mask_from_scores(target, policy, seq_len, block_size).to_dense()
    block_recall = (pred & true).sum().item() / max(true.sum().item(), 1)
    mass_recall = (target.float() * pred).sum(-1).mean().item()
    return {"density": density, "block_recall": block_recall, "mass_recall": mass_recall}


def _check_decode_shapes(name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape or logits.dim() != 4:
        raise ValueError(
            f"{name} needs logits and target of one shape [B, Hkv, T, NB], got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )


def decode_gate_loss(logits: torch.Tensor, target: torch.Tensor, skip_rows: int = 0) -> torch.Tensor:
    """KL(target || softmax over the scored blocks) per token row, averaged over (batch, KV head, row).

    Args:
        logits: [B, Hkv, T, NB] decode-gate logits, ``-inf`` on the blocks not scored (row t scores the
            blocks completed before its own, ``J < t // block_size``).
        target: [B, Hkv, T, NB] the decode target: rows sum to 1 over the scored blocks, zero elsewhere;
            rows without a scored block are all zero.
        skip_rows: leave out the first token rows as well.

    Returns:
        scalar fp32, the mean KL over the rows ``>= skip_rows`` that score at least one block (rows
        without one have nothing to learn and are excluded, not counted as zero).
    """
    _check_decode_shapes("decode_gate_loss", logits, target)
    t = logits.shape[2]
    if not 0 <= skip_rows < t:
        raise ValueError(f"skip_rows must be in [0, T={t}), got {skip_rows}")
    scored = torch.isfinite(logits)
    rows = scored.any(-1)
    rows[..., :skip_rows] = False
    # rows without a scored block get finite dummies: their log-softmax would be NaN, and a NaN there would
    # reach the gradient through the softmax's backward even though the row is masked out
    log_q = torch.log_softmax(logits.float().masked_fill(~rows.unsqueeze(-1), 0.0), dim=-1)
    kl = _kl_rows(log_q, target, scored)
    return (kl * rows).sum() / rows.sum().clamp_min(1)  # == kl[rows].mean() without a data-dependent shape


@torch.no_grad()
def decode_gate_metrics(logits: torch.Tensor, target: torch.Tensor, budget: float, block_size: int) -> dict:
    """How much of the decode target a token budget of ``budget`` x the context keeps.

    Row t (the token at position t, context ``t + 1`` tokens) gets ``K = floor(budget * (t + 1)) //
    block_size`` block slots, as :class:`~seerattn.decode_policy.DecodePolicy` ``"budget"`` counts them:
    the current block takes one, the first block one (always kept, also when ``K < 2``), the rest go to
    the completed blocks with the highest score. The gate picks by its logits, the oracle by the target.

    Returns floats over the rows that score at least one block:
        ``mass_recall``: mean target mass inside the gate's kept blocks (1.0 = nothing lost);
        ``oracle_mass_recall``: the same for the target's own choice (the best any gate can do);
        ``block_recall``: fraction of the oracle's kept blocks that the gate keeps too (the first block, which
        both keep, included);
        ``budget``: the budget fraction.
    """
    _check_decode_shapes("decode_gate_metrics", logits, target)
    if not 0 < budget <= 1:
        raise ValueError(f"decode_gate_metrics: budget must be a fraction of the context in (0, 1], got {budget!r}")
    _, _, t, nb = logits.shape
    scored = torch.isfinite(logits)
    rows = scored.any(-1)
    ctx = torch.arange(1, t + 1, device=logits.device, dtype=torch.float64)
    slots = (torch.floor(budget * ctx).long() // block_size - 1).clamp_min(1).view(1, 1, t, 1)  # completed slots
    first = torch.arange(nb, device=logits.device) == 0

    def keep(scores: torch.Tensor) -> torch.Tensor:
        s = scores.float().masked_fill(~scored, float("-inf")).masked_fill(first & scored, float("inf"))
        rank = s.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return scored & (rank < slots)

    pred, true = keep(logits), keep(target)
    tgt = target.float()
    n = rows.sum().clamp_min(1)
    mass = ((tgt * pred).sum(-1) * rows).sum() / n
    oracle = ((tgt * true).sum(-1) * rows).sum() / n
    block = (pred & true).sum() / true.sum().clamp_min(1)
    return {
        "budget": budget,
        "mass_recall": mass.item(),
        "oracle_mass_recall": oracle.item(),
        "block_recall": block.item(),
    }
