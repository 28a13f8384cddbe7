"""Distillation loss and quality metrics of a gate against the ground-truth block map.

Shape legend: B batch, H query heads, NB blocks; ``logits`` and ``target`` are ``[B, H, NB, NB]``.
"""

from __future__ import annotations

import torch

from ..block_mask import SparsityPolicy, mask_from_scores

__all__ = ["gate_loss", "gate_metrics"]


def _causal(nb: int, device) -> torch.Tensor:
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


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
    t = target.float()
    valid = causal & (t > 0)
    kl = torch.where(valid, t * (torch.log(t.clamp_min(1e-30)) - log_q.masked_fill(~valid, 0.0)), 0.0)
    return kl.sum(-1)[..., skip_first_rows:].mean()


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
