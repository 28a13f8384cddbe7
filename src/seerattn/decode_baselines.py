"""Decode baselines at the decode gate's token budget: StreamingLLM-style, Quest-style and the attention oracle.

Each baseline scores the key blocks of every (sequence, KV head) and hands the scores to
:func:`~seerattn.decode_policy.select_decode_blocks` with a :class:`~seerattn.decode_policy.DecodePolicy`
``"budget"``, so its output is the decode gate's: int32 ``[B, Hkv, K]`` block lists, -1 padded,
``K = budget // block_size`` slots, the first block (attention sink) and the current, partial block
always kept and counted against the budget. At one budget every method reads the same number of
blocks; only *which* completed blocks differs.

- StreamingLLM-style (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"):
  the sink (first block) and the most recent blocks. Scores are the block indices (later = higher),
  the same for every KV head and query.
- Quest-style (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
  Inference"): per block the element-wise min and max of its keys; a block's score is the upper bound
  ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` of ``q . k`` over its keys, per query head, then the max
  over the KV group's query heads (one list per group, as the decode gate). Queries and keys are the
  ones attention uses (post-RoPE, as Quest reads the KV cache). Quest keeps its first two layers dense;
  that is the caller's choice (a per-layer decision), not this function's.
- Oracle (an upper bound, not a method: it computes the dense attention it would save): per block the
  query's true attention probability, max-pooled over the block's keys and over the KV group's query
  heads, the decode gate's distillation target (:func:`seerattn.ops.reference.decode_block_scores`) at the
  row's own position. It tells a gate's misses (the oracle keeps the right blocks) from the budget's (no
  selection of this size does).

Every selection takes one new token per sequence (a decode step: q ``[B, Hq, D]``, ``cache_seqlens``
``[B]``, lists ``[B, Hkv, K]``) or N query rows per sequence (a teacher-forced evaluation, the rows of a
window each selecting as a decode step at its position would: q ``[B, Hq, N, D]``, ``cache_seqlens``
``[B, N]``, lists ``[B, Hkv, N, K]``).

Shape legend: B sequences, Hq / Hkv query / KV heads, G = Hq / Hkv, N query rows per sequence, D head
dim, T cache tokens, NB = ceil(T / block_size) key blocks, K selected blocks.
"""

from __future__ import annotations

import torch

from .block_mask import num_blocks
from .decode_policy import DecodePolicy, select_decode_blocks
from .gate import pool_blocks
from .ops.reference import decode_block_max

__all__ = [
    "oracle_block_scores",
    "oracle_decode_blocks",
    "quest_block_bounds",
    "quest_block_scores",
    "quest_decode_blocks",
    "streaming_decode_blocks",
]


def _select(scores: torch.Tensor, cache_seqlens: torch.Tensor, budget: int, block_size: int, kv_blocks: int):
    """scores [B, Hkv, N, NB] and cache_seqlens [B, N] -> int32 [B, Hkv, N, K] (rows folded into the batch)."""
    b, hkv, n, nb = scores.shape
    if cache_seqlens.shape != (b, n):
        raise ValueError(f"cache_seqlens must be [B, N] = [{b}, {n}] for these rows, got {tuple(cache_seqlens.shape)}")
    flat = scores.permute(0, 2, 1, 3).reshape(b * n, hkv, nb)
    idx = select_decode_blocks(
        flat, cache_seqlens.reshape(b * n), DecodePolicy("budget", budget), block_size, kv_blocks
    )
    return idx.view(b, n, hkv, -1).permute(0, 2, 1, 3)


def _rows(q: torch.Tensor, cache_seqlens: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """q, cache_seqlens as [B, Hq, N, D], [B, N]; whether they came as one decode step (N = 1 added)."""
    if q.dim() == 3 and cache_seqlens.dim() == 1:
        return q.unsqueeze(2), cache_seqlens.view(-1, 1), True
    if q.dim() == 4 and cache_seqlens.dim() == 2:
        return q, cache_seqlens, False
    raise ValueError(
        f"{what} needs q [B, Hq, D] with cache_seqlens [B] (a decode step) or q [B, Hq, N, D] with cache_seqlens "
        f"[B, N] (N rows), got {tuple(q.shape)} and {tuple(cache_seqlens.shape)}"
    )


def streaming_decode_blocks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    budget: int,
    block_size: int,
    kv_blocks: int | None = None,
) -> torch.Tensor:
    """StreamingLLM-style selection: first block + current block + the most recent completed blocks.

    Args:
        q: [B, Hq, D] or [B, Hq, N, D] (only its shape is read: the selection ignores the queries).
        k_cache: [B, Hkv, Tmax, D] (only its shape is read).
        cache_seqlens: int [B] or [B, N], keys visible to each row (its position + 1).
        budget: tokens (``DecodePolicy("budget", budget)``: ``budget // block_size`` blocks).
        block_size: tokens per key block.
        kv_blocks: blocks covering the cache capacity; default ``ceil(Tmax / block_size)``.

    Returns:
        int32 [B, Hkv, K] (or [B, Hkv, N, K]) as :func:`~seerattn.decode_policy.select_decode_blocks`; every
        KV head gets the same list.
    """
    _, lens, step = _rows(q, cache_seqlens, "streaming_decode_blocks")
    b, n = lens.shape
    kv_blocks = num_blocks(k_cache.shape[2], block_size) if kv_blocks is None else kv_blocks
    j = torch.arange(kv_blocks, device=q.device, dtype=torch.float32)  # later blocks score higher
    idx = _select(j.expand(b, k_cache.shape[1], n, kv_blocks), lens, budget, block_size, kv_blocks)
    return idx[:, :, 0] if step else idx


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
        q: [B, Hq, N, D] query rows (post-RoPE).
        kmin, kmax: [B, Hkv, NB, D] from :func:`quest_block_bounds`.

    Returns:
        [B, Hkv, N, NB] fp32 (fp64 for fp64 inputs): ``max_h sum_d max(q_hd * kmin_d, q_hd * kmax_d)`` over the
        group's heads h, computed as ``q . (kmin + kmax) / 2 + |q| . (kmax - kmin) / 2`` (equal, as kmax >= kmin:
        two matmuls instead of a [.., N, NB, D] temporary).
    """
    if q.dim() != 4 or kmin.dim() != 4 or kmin.shape != kmax.shape or q.shape[0] != kmin.shape[0]:
        raise ValueError(
            f"quest_block_scores needs q [B, Hq, N, D] and kmin, kmax [B, Hkv, NB, D] of one shape, got "
            f"{tuple(q.shape)}, {tuple(kmin.shape)}, {tuple(kmax.shape)}"
        )
    b, hq, n, d = q.shape
    hkv = kmin.shape[1]
    if hq % hkv or kmin.shape[-1] != d:
        raise ValueError(f"quest_block_scores: Hq ({hq}) must be a multiple of Hkv ({hkv}) and D must agree")
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dt).reshape(b, hkv, hq // hkv * n, d)
    lo, hi = kmin.to(dt), kmax.to(dt)
    mid, half = ((lo + hi) / 2).transpose(-1, -2), ((hi - lo) / 2).transpose(-1, -2)
    s = torch.matmul(qg, mid) + torch.matmul(qg.abs(), half)  # [B, Hkv, G * N, NB]
    return s.view(b, hkv, hq // hkv, n, -1).amax(2)


def quest_decode_blocks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    budget: int,
    block_size: int,
    kv_blocks: int | None = None,
) -> torch.Tensor:
    """Quest-style selection: first + current block + the completed blocks of highest bound.

    Args:
        q: [B, Hq, D] the new tokens' queries, or [B, Hq, N, D] query rows (post-RoPE).
        k_cache: [B, Hkv, Tmax, D] post-RoPE keys; a row scores only the blocks completed before its current
            block, so keys at or past its ``cache_seqlens`` do not matter.
        cache_seqlens: int [B] or [B, N], keys visible to each row (its position + 1).
        budget: tokens (``budget // block_size`` blocks).
        block_size: tokens per key block.
        kv_blocks: blocks covering the cache capacity; default ``ceil(Tmax / block_size)``.

    Returns:
        int32 [B, Hkv, K] (or [B, Hkv, N, K]) as :func:`~seerattn.decode_policy.select_decode_blocks`.
    """
    q4, lens, step = _rows(q, cache_seqlens, "quest_decode_blocks")
    kv_blocks = num_blocks(k_cache.shape[2], block_size) if kv_blocks is None else kv_blocks
    kmin, kmax = quest_block_bounds(k_cache, block_size)
    idx = _select(quest_block_scores(q4, kmin, kmax), lens, budget, block_size, kv_blocks)
    return idx[:, :, 0] if step else idx


def oracle_block_scores(
    q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int, scale: float
) -> torch.Tensor:
    """Each row's attention probability over its visible keys, max-pooled per key block and over the KV group.

    Args:
        q: [B, Hq, N, D] query rows (post-RoPE, as attention reads them).
        k_cache: [B, Hkv, Tmax, D] post-RoPE keys.
        cache_seqlens: int [B, N], keys visible to each row (its position + 1).
        block_size: tokens per key block.
        scale: the attention's softmax scale.

    Returns:
        [B, Hkv, N, NB] fp32 (fp64 for fp64 inputs), NB = ceil(Tmax / block_size): for row n, the largest
        probability any of the group's heads puts on a key of block J (0 for keys at or past ``cache_seqlens``).
        Temporaries: [B, Hq, N, Tmax] (the caller chunks its rows).
    """
    if q.dim() != 4 or k_cache.dim() != 4 or q.shape[0] != k_cache.shape[0] or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(
            f"oracle_block_scores needs q [B, Hq, N, D] and k_cache [B, Hkv, Tmax, D], got {tuple(q.shape)} and "
            f"{tuple(k_cache.shape)}"
        )
    b, hq, n, _ = q.shape
    hkv = k_cache.shape[1]
    if hq % hkv:
        raise ValueError(f"oracle_block_scores: Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if cache_seqlens.shape != (b, n):
        raise ValueError(f"cache_seqlens must be [B, N] = [{b}, {n}], got {tuple(cache_seqlens.shape)}")
    return decode_block_max(q, k_cache, cache_seqlens, block_size, scale)  # the decode target's pooling


def oracle_decode_blocks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    budget: int,
    block_size: int,
    scale: float,
    kv_blocks: int | None = None,
) -> torch.Tensor:
    """Attention-oracle selection: first + current block + the completed blocks of highest true attention
    (:func:`oracle_block_scores`; an upper bound for a gate at this budget, see the module docstring).

    Args:
        q: [B, Hq, D] the new tokens' queries, or [B, Hq, N, D] query rows (post-RoPE).
        k_cache: [B, Hkv, Tmax, D] post-RoPE keys.
        cache_seqlens: int [B] or [B, N], keys visible to each row (its position + 1).
        budget: tokens (``budget // block_size`` blocks).
        block_size: tokens per key block.
        scale: the attention's softmax scale.
        kv_blocks: blocks covering the cache capacity; default ``ceil(Tmax / block_size)``.

    Returns:
        int32 [B, Hkv, K] (or [B, Hkv, N, K]) as :func:`~seerattn.decode_policy.select_decode_blocks`.
    """
    q4, lens, step = _rows(q, cache_seqlens, "oracle_decode_blocks")
    kv_blocks = num_blocks(k_cache.shape[2], block_size) if kv_blocks is None else kv_blocks
    scores = oracle_block_scores(q4, k_cache, lens, block_size, scale)
    idx = _select(scores, lens, budget, block_size, kv_blocks)
    return idx[:, :, 0] if step else idx
