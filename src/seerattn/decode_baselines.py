"""Training-free decode baselines at the decode gate's token budget: StreamingLLM-style and Quest-style.

Each baseline scores the key blocks of every (sequence, KV head) and hands the scores to
:func:`~seerattn.decode_policy.select_decode_blocks` with a :class:`~seerattn.decode_policy.DecodePolicy`
``"budget"``, so its output is the decode gate's: int32 ``[B, Hkv, K]`` block lists, -1 padded,
``K = budget // block_size`` slots, the first block (attention sink) and the current, partial block
always kept and counted against the budget. At one budget every method reads the same number of
blocks; only *which* completed blocks differs.

- StreamingLLM-style (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"):
  the sink (first block) and the most recent blocks. Scores are the block indices (later = higher),
  the same for every KV head.
- Quest-style (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
  Inference"): per block the element-wise min and max of its keys; a block's score is the upper bound
  ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` of ``q . k`` over its keys, per query head, then the max
  over the KV group's query heads (one list per group, as the decode gate). Queries and keys are the
  ones attention uses (post-RoPE, as Quest reads the KV cache). Quest keeps its first two layers dense;
  that is the caller's choice (a per-layer decision), not this function's.

Shape legend: B sequences, Hq / Hkv query / KV heads, G = Hq / Hkv, D head dim, T cache tokens,
NB = ceil(T / block_size) key blocks, K selected blocks.
"""

from __future__ import annotations

import torch

from .decode_policy import DecodePolicy, select_decode_blocks
from .gate import pool_blocks

__all__ = [
    "quest_block_bounds",
    "quest_block_scores",
    "quest_decode_blocks",
    "streaming_block_scores",
    "streaming_decode_blocks",
]


def streaming_block_scores(batch: int, num_kv_heads: int, num_blocks: int, device=None) -> torch.Tensor:
    """[B, Hkv, NB] fp32 scores ``J`` (the block index): the highest-scoring blocks are the most recent."""
    j = torch.arange(num_blocks, device=device, dtype=torch.float32)
    return j.expand(batch, num_kv_heads, num_blocks)


def streaming_decode_blocks(
    cache_seqlens: torch.Tensor, num_kv_heads: int, budget: int, block_size: int, kv_blocks: int
) -> torch.Tensor:
    """StreamingLLM-style selection: first block + current block + the most recent completed blocks.

    Args:
        cache_seqlens: int [B] tokens in each cache, the new token included.
        num_kv_heads: Hkv (every KV head gets the same list).
        budget: tokens (``DecodePolicy("budget", budget)``: ``budget // block_size`` blocks).
        block_size: tokens per key block.
        kv_blocks: blocks covering the KV cache capacity (static; must cover each current block).

    Returns:
        int32 [B, Hkv, K] as :func:`~seerattn.decode_policy.select_decode_blocks`.
    """
    scores = streaming_block_scores(cache_seqlens.shape[0], num_kv_heads, kv_blocks, cache_seqlens.device)
    return select_decode_blocks(scores, cache_seqlens, DecodePolicy("budget", budget), block_size, kv_blocks)


def quest_block_bounds(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max of each block's keys: k [B, Hkv, T, D] -> kmin, kmax [B, Hkv, NB, D].

    A partial last block is bounded over the keys it has. The bounds of a completed block never change,
    so a decode loop (or a teacher-forced evaluation) computes them once per block, as Quest's metadata
    cache does.
    """
    if k.dim() != 4:
        raise ValueError(f"quest_block_bounds needs k [B, Hkv, T, D], got shape {tuple(k.shape)}")
    kmin, kmax = pool_blocks(k, block_size, ("min", "max")).chunk(2, dim=-1)
    return kmin, kmax


def quest_block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of ``q . k`` per block, max over each KV group's query heads.

    Args:
        q: [B, Hq, D] the new tokens' queries (post-RoPE).
        kmin, kmax: [B, Hkv, NB, D] from :func:`quest_block_bounds`.

    Returns:
        [B, Hkv, NB] fp32 (fp64 for fp64 inputs): ``max_h sum_d max(q_hd * kmin_d, q_hd * kmax_d)`` over the
        group's heads h.
    """
    if q.dim() != 3 or kmin.dim() != 4 or kmin.shape != kmax.shape or q.shape[0] != kmin.shape[0]:
        raise ValueError(
            f"quest_block_scores needs q [B, Hq, D] and kmin, kmax [B, Hkv, NB, D] of one shape, got "
            f"{tuple(q.shape)}, {tuple(kmin.shape)}, {tuple(kmax.shape)}"
        )
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    if hq % hkv or kmin.shape[-1] != d:
        raise ValueError(f"quest_block_scores: Hq ({hq}) must be a multiple of Hkv ({hkv}) and D must agree")
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dt).view(b, hkv, hq // hkv, 1, d)
    lo, hi = kmin.to(dt).unsqueeze(2), kmax.to(dt).unsqueeze(2)  # [B, Hkv, 1, NB, D]
    return torch.maximum(qg * lo, qg * hi).sum(-1).amax(2)


def quest_decode_blocks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    budget: int,
    block_size: int,
    kv_blocks: int | None = None,
) -> torch.Tensor:
    """Quest-style selection for one decode step: first + current block + the blocks of highest bound.

    Args:
        q: [B, Hq, D] the new tokens' queries (post-RoPE).
        k_cache: [B, Hkv, Tmax, D] post-RoPE keys; only the blocks completed before each sequence's
            current block are scored, so keys at or past ``cache_seqlens`` do not matter.
        cache_seqlens: int [B] tokens in each cache, the new token included.
        budget: tokens (``budget // block_size`` blocks).
        block_size: tokens per key block.
        kv_blocks: blocks covering the cache capacity; default ``ceil(Tmax / block_size)``.

    Returns:
        int32 [B, Hkv, K] as :func:`~seerattn.decode_policy.select_decode_blocks`.
    """
    kmin, kmax = quest_block_bounds(k_cache, block_size)
    scores = quest_block_scores(q, kmin, kmax)
    return select_decode_blocks(scores, cache_seqlens, DecodePolicy("budget", budget), block_size, kv_blocks)
