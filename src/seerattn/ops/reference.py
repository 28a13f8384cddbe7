"""Eager PyTorch oracles for every op (CPU or GPU, fp64-capable, differentiable).

Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), T tokens, D head dim,
NB = ceil(T / block_size) blocks. Layout is ``[B, H, T, D]``. Attention is causal with queries and
keys at the same positions (prefill). Arithmetic runs in fp32 (fp64 when the inputs are fp64);
outputs come back in the input dtype, ``lse`` and ``block_scores`` in fp32/fp64.

Rows are processed in chunks of query blocks so that the ``[chunk, T]`` score matrix, never the
whole ``T x T`` map, is materialised per (batch, head).
"""

from __future__ import annotations

import itertools
import math

import torch

from ..block_mask import BlockMask, num_blocks

__all__ = [
    "attention_with_block_scores",
    "block_sparse_attention",
    "causal_attention",
    "decode_block_max",
    "decode_block_scores",
    "gather_paged_kv",
    "sparse_decode_attention",
]

_ROW_CHUNK_TOKENS = 1024


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_kv(k: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    group = num_q_heads // k.shape[1]
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def _attend(q, k, v, scale, keep):
    """Masked softmax attention on one row chunk.

    q: [B, H, R, D]; k, v: [B, H, T, D]; keep: bool broadcastable to [B, H, R, T].
    Returns out [B, H, R, D], lse [B, H, R] (-inf on empty rows), logits [B, H, R, T] (masked -inf).
    """
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    empty = torch.isinf(lse)
    # Empty rows: subtract 0 instead of -inf so exp gives 0, never NaN.
    p = torch.exp(logits - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
    # Values no row of the chunk attends to (past a decode cache's end, unselected blocks) are zeroed:
    # 0 x NaN in the matmul would otherwise spread a NaN (or the garbage of an uninitialised cache)
    # into rows that never read it, empty rows included, which the kernels do not do.
    v = v.masked_fill(~keep.expand(*p.shape).any(-2).unsqueeze(-1), 0.0)
    return torch.matmul(p, v), lse, logits


def causal_attention(q, k, v, scale: float | None = None, return_lse: bool = False):
    """Dense causal attention (the baseline every block-sparse result is compared with).

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] -> out [B, Hq, T, D] (and lse [B, Hq, T]).
    """
    t = q.shape[2]
    nb = num_blocks(t, 64)
    mask = torch.ones(1, 1, nb, nb, dtype=torch.bool, device=q.device).tril()
    full = BlockMask.from_dense(mask, block_size=64, seq_len=t)  # broadcast over batch and heads
    return block_sparse_attention(q, k, v, full, scale=scale, return_lse=return_lse)


def attention_with_block_scores(q, k, v, block_size: int = 64, scale: float | None = None):
    """Causal attention plus the SeerAttention ground truth.

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, T, D].
        block_size: tokens per block (last block may be partial).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        out: [B, Hq, T, D] in q's dtype.
        lse: [B, Hq, T] log-sum-exp of the scaled causal logits (fp32, fp64 for fp64 inputs).
        block_scores: [B, Hq, NB, NB]: ``GT[I, J] = max over rows of block I and columns of block
            J of the causal softmax map``, each row normalised to sum 1, zero above the diagonal.
    """
    b, hq, t, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdt = _compute_dtype(q)
    qf, kf, vf = q.to(cdt), _expand_kv(k, hq).to(cdt), _expand_kv(v, hq).to(cdt)
    nb = num_blocks(t, block_size)
    pad = nb * block_size - t
    outs, lses, scores = [], [], []
    chunk = max(block_size, (_ROW_CHUNK_TOKENS // block_size) * block_size)
    cols = torch.arange(t, device=q.device)
    for r0 in range(0, t, chunk):
        r1 = min(r0 + chunk, t)
        rows = torch.arange(r0, r1, device=q.device)
        keep = cols.view(1, -1) <= rows.view(-1, 1)
        o, lse, logits = _attend(qf[:, :, r0:r1], kf, vf, scale, keep)
        p = torch.exp(logits - lse.unsqueeze(-1))  # causal softmax rows, [B, H, R, T]
        p = torch.nn.functional.pad(p, (0, pad))  # zeros never win a max of probabilities
        col_max = p.view(b, hq, r1 - r0, nb, block_size).amax(-1)  # [B, H, R, NB]
        rpad = -(r1 - r0) % block_size
        col_max = torch.nn.functional.pad(col_max, (0, 0, 0, rpad))
        scores.append(col_max.view(b, hq, -1, block_size, nb).amax(3))
        outs.append(o)
        lses.append(lse)
    block_scores = torch.cat(scores, dim=2)
    block_scores = block_scores / block_scores.sum(-1, keepdim=True)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2), block_scores


def _slice_mask(mask: BlockMask, batch: int, seq_len: int) -> BlockMask:
    """The mask of one sequence (batch entry), cut to ``seq_len`` tokens."""
    nb = num_blocks(seq_len, mask.block_size)
    dense = mask.to_dense()[batch : batch + 1, :, :nb, :nb]
    return BlockMask.from_dense(dense, mask.block_size, seq_len)


def block_sparse_attention(
    q,
    k,
    v,
    block_mask: BlockMask,
    scale: float | None = None,
    return_lse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Causal attention restricted to the kept blocks of ``block_mask``.

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]. With ``cu_seqlens`` (varlen): B == 1 and T is the
            total of all sequences, packed back to back.
        block_mask: mask with B (or number of sequences) batch entries and Hq or Hkv heads; an
            Hkv mask is shared by the query heads of each group.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return lse [B, Hq, T] (-inf where a row has no kept key).
        cu_seqlens: int32 [N + 1] sequence boundaries for varlen; the mask covers the longest
            sequence and each sequence uses its top-left corner.

    Returns:
        out [B, Hq, T, D] in q's dtype (zeros on rows with no kept key), and lse if asked.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, lses = [], []
        for i, (s0, s1) in enumerate(itertools.pairwise(bounds)):
            if s1 == s0:
                continue
            m = _slice_mask(block_mask, i, s1 - s0)
            o, lse = block_sparse_attention(
                q[:, :, s0:s1], k[:, :, s0:s1], v[:, :, s0:s1], m, scale=scale, return_lse=True
            )
            outs.append(o)
            lses.append(lse)
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
        return (out, lse) if return_lse else out

    b, hq, t, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdt = _compute_dtype(q)
    qf, kf, vf = q.to(cdt), _expand_kv(k, hq).to(cdt), _expand_kv(v, hq).to(cdt)
    bs = block_mask.block_size
    dense = block_mask.expand_heads(hq).to_dense()  # [B, Hq, NB, NB]
    outs, lses = [], []
    chunk = max(bs, (_ROW_CHUNK_TOKENS // bs) * bs)
    cols = torch.arange(t, device=q.device)
    for r0 in range(0, t, chunk):
        r1 = min(r0 + chunk, t)
        rows = torch.arange(r0, r1, device=q.device)
        blk = dense[:, :, r0 // bs : num_blocks(r1, bs)]
        tok = blk.repeat_interleave(bs, dim=-2)[:, :, r0 % bs : r0 % bs + (r1 - r0)]
        tok = tok.repeat_interleave(bs, dim=-1)[..., :t]
        keep = tok & (cols.view(1, -1) <= rows.view(-1, 1))
        o, lse, _ = _attend(qf[:, :, r0:r1], kf, vf, scale, keep)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, 2).to(q.dtype)
    lse = torch.cat(lses, 2)
    return (out, lse) if return_lse else out


# ====================================================================== decode (one new token per sequence)
def gather_paged_kv(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Contiguous copy of a paged cache: pages [P, page, Hkv, D], block_table int32 [B, max_pages] ->
    [B, Hkv, max_pages * page, D] (token ``t`` of sequence ``b`` lives in page ``block_table[b, t // page]``)."""
    b, n = block_table.shape
    _, page, hkv, d = pages.shape
    g = pages[block_table.long().clamp(min=0)]  # [B, max_pages, page, Hkv, D]
    return g.reshape(b, n * page, hkv, d).transpose(1, 2)


def _kept_tokens(block_indices: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int, t: int) -> torch.Tensor:
    """Bool [B, Hkv, T]: the key positions of the selected blocks that lie inside each sequence."""
    b, hkv, _ = block_indices.shape
    nb = num_blocks(t, block_size)
    idx = block_indices.long()
    idx = torch.where((idx >= 0) & (idx < nb), idx, nb)  # padding (and out-of-range) -> a spare column
    blk = torch.zeros(b, hkv, nb + 1, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)[..., :nb]
    pos = torch.arange(t, device=idx.device)
    tok = blk.repeat_interleave(block_size, dim=-1)[..., :t]
    return tok & (pos < cache_seqlens.to(idx.device).long().view(b, 1, 1))


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    cache_starts: torch.Tensor | None = None,
):
    """Attention of one new query token per sequence over the selected key blocks of its cache.

    Args:
        q: [B, Hq, D], the token at position ``cache_seqlens[b] - 1`` of its sequence (already in the cache).
        k_cache, v_cache: contiguous [B, Hkv, Tmax, D], or paged [P, page, Hkv, D] with ``block_table``.
        cache_seqlens: int32 [B], tokens in each sequence's cache (the new one included).
        block_indices: int32 [B, Hkv, K], selected key blocks per (sequence, KV head), -1 = padding;
            keys at or past ``cache_seqlens[b]`` are masked (the current, partial block).
        block_size: tokens per key block.
        block_table: int32 [B, max_pages] page ids of each sequence (paged layout only).
        scale: softmax scale, default ``1 / sqrt(D)``.
        cache_starts: int32 [B] or None (contiguous cache): sequence b's tokens begin at token
            ``cache_starts[b]`` of its row; positions and blocks count from there.

    Returns:
        out [B, Hq, D] in q's dtype (zeros where nothing is selected), and lse [B, Hq] (fp32, fp64
        for fp64 inputs; -inf where nothing is selected) if ``return_lse``.
    """
    if block_table is not None:
        k_cache, v_cache = gather_paged_kv(k_cache, block_table), gather_paged_kv(v_cache, block_table)
    b, hq, d = q.shape
    t = k_cache.shape[2]
    if cache_starts is not None:  # each row shifted to begin at its sequence (the tail past the row: masked)
        rows = (cache_starts.to(k_cache.device).long().view(b, 1) + torch.arange(t, device=k_cache.device)).clamp(
            max=t - 1
        )
        index = rows.view(b, 1, t, 1).expand(b, k_cache.shape[1], t, d)
        k_cache, v_cache = k_cache.gather(2, index), v_cache.gather(2, index)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdt = _compute_dtype(q)
    keep = _kept_tokens(block_indices, cache_seqlens, block_size, t)  # [B, Hkv, T]
    keep = _expand_kv(keep.unsqueeze(-2), hq)  # [B, Hq, 1, T]
    kf, vf = _expand_kv(k_cache, hq).to(cdt), _expand_kv(v_cache, hq).to(cdt)
    out, lse, _ = _attend(q.to(cdt).unsqueeze(2), kf, vf, scale, keep)
    out = out.squeeze(2).to(q.dtype)
    return (out, lse.squeeze(2)) if return_lse else out


def decode_block_max(
    q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, block_size: int, scale: float
) -> torch.Tensor:
    """Each query row's softmax over the keys it sees, max-pooled inside each key block and over the query heads
    of each GQA group: the values of the decode gate's target (:func:`decode_block_scores`) and of the attention
    oracle (:func:`seerattn.decode_baselines.oracle_block_scores`), before either keeps or renormalises blocks.

    Args:
        q: [B, Hq, R, D] query rows; k: [B, Hkv, Tk, D] keys (post-RoPE: the model's attention); Hq a multiple of
            Hkv.
        visible: int [B or 1, R], how many leading keys each row sees (its position + 1); keys past it get 0.
        block_size: tokens per key block; scale: the softmax scale.

    Returns:
        [B, Hkv, R, ceil(Tk / block_size)] fp32 (fp64 for fp64 inputs); a partial last block pools the keys it
        has. Temporaries: the [B, Hq, R, Tk] logits, turned into probabilities (in place where possible) and
        pooled; K is not repeated over the groups.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"decode_block_max needs q [B, Hq, R, D] and k [B, Hkv, Tk, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    b, hq, r, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"decode_block_max: Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if visible.shape not in ((b, r), (1, r)):
        raise ValueError(f"decode_block_max: visible must be [B or 1, R] = [{b} or 1, {r}], got {tuple(visible.shape)}")
    g = hq // hkv
    cdt = _compute_dtype(q)
    logits = torch.matmul(q.to(cdt).reshape(b, hkv, g * r, d), k.to(cdt).transpose(-1, -2))
    logits = logits.mul_(scale).view(b, hkv, g, r, tk)
    unseen = torch.arange(tk, device=q.device).view(1, 1, -1) >= visible.to(q.device).view(-1, r, 1)
    p = torch.softmax(logits.masked_fill_(unseen.view(-1, 1, 1, r, tk), float("-inf")), dim=-1)
    del logits
    full = tk // block_size
    s = p[..., : full * block_size].unflatten(-1, (full, block_size)).amax(dim=(2, 5))  # [B, Hkv, R, full]
    if tk % block_size:  # the partial last block
        s = torch.cat([s, p[..., full * block_size :].amax(dim=(2, 4)).unsqueeze(-1)], dim=-1)
    return s


def decode_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    row_chunk: int = _ROW_CHUNK_TOKENS,
) -> torch.Tensor:
    """Distillation target of the decode gate, every token of a sequence taken as a decode query.

    For the query at position ``t``: its causal softmax over the keys ``<= t``, max-pooled inside each
    key block and over the query heads of each GQA group, restricted to the completed blocks
    ``J < t // block_size`` (the current block is always kept, so the gate does not score it) and
    renormalised to sum 1 over them.

    Queries are taken ``row_chunk`` at a time against the keys they can see (``< r1``, the chunk's
    end), so the temporaries are two ``[B, Hq, row_chunk, T]`` tensors (O(row_chunk * T) per head),
    never a ``T x T`` map of every head; K is not repeated over the groups.

    Args:
        q: [B, Hq, T, D]; k: [B, Hkv, T, D] (post-RoPE: the model's own attention).
        block_size: tokens per key block.
        scale: softmax scale, default ``1 / sqrt(D)`` (pass the model's, e.g. ``attn.scaling``).
        row_chunk: query rows per chunk (>= 1); any value gives the same result.

    Returns:
        [B, Hkv, T, NB] fp32 (fp64 for fp64 inputs), NB = ceil(T / block_size); zero on and past the
        current block; rows of the first block (no completed block yet) are all zero.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"decode_block_scores needs q [B, Hq, T, D] and k [B, Hkv, T, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"decode_block_scores: Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if not isinstance(row_chunk, int) or row_chunk < 1:
        raise ValueError(f"decode_block_scores: row_chunk must be an int >= 1, got {row_chunk!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb = num_blocks(t, block_size)
    out = []
    for r0 in range(0, t, row_chunk):
        r1 = min(r0 + row_chunk, t)
        rows = torch.arange(r0, r1, device=q.device)
        # the chunk's rows against the keys they can see (< r1): two [B, Hq, R, r1] temporaries at most
        s = decode_block_max(q[:, :, r0:r1], k[:, :, :r1], (rows + 1).view(1, -1), block_size, scale)
        s = torch.nn.functional.pad(s, (0, nb - s.shape[-1]))
        completed = torch.arange(nb, device=q.device).view(1, -1) < (rows // block_size).view(-1, 1)
        s = s * completed
        total = s.sum(-1, keepdim=True)
        out.append(s / torch.where(total > 0, total, torch.ones_like(total)))
    return torch.cat(out, dim=2)
