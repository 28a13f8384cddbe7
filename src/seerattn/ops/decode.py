"""Sparse decode attention: the public, validated entry point (``impl`` dispatch as in :mod:`seerattn.ops`),
the fused decode-gate scores + token-budget block selection that feeds it (:func:`budget_decode_blocks`), and the
blocks' Quest bound of ``DecodePolicy.bound_slots`` and its picks (:func:`quest_bound_scores`,
:func:`top_block_indices`).

Shape legend: B sequences, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), D head dim, Tmax cache
capacity in tokens, K selected key blocks per (sequence, KV head) (static: a token budget / block size),
P pages, ``page`` tokens per page, NB gate-key blocks of the cache capacity, Dg gate dim.
"""

from __future__ import annotations

import torch

from ..block_mask import check_block_size, num_blocks
from . import reference

__all__ = ["budget_decode_blocks", "quest_bound_scores", "sparse_decode_attention", "top_block_indices"]

_OP = "sparse_decode_attention"


def _check_tensor(x, name: str, dims: int, legend: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{_OP}: {name} must be {dims}-D {legend}, got shape {tuple(x.shape)}")


def _check_int32(x, name: str, shape: tuple, legend: str, device: torch.device) -> None:
    _check_tensor(x, name, len(shape), legend)
    if x.dtype != torch.int32:
        raise TypeError(f"{_OP}: {name} must be int32 {legend}, got {x.dtype}")
    if tuple(x.shape[: len(shape)]) != tuple(s if s is not None else x.shape[i] for i, s in enumerate(shape)):
        raise ValueError(f"{_OP}: {name} must be {legend}, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{_OP}: {name} is on {x.device} but q is on {device}")


def _validate(q, k_cache, v_cache, cache_seqlens, block_indices, block_size, block_table, cache_starts) -> int:
    """Every check that needs no device read (all of them on CPU tensors); returns the capacity in tokens."""
    _check_tensor(q, "q", 3, "[B, Hq, D]")
    paged = block_table is not None
    legend = "[P, page, Hkv, D] (paged)" if paged else "[B, Hkv, Tmax, D]"
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(x, name, 4, legend)
        if x.dtype != q.dtype or not x.is_floating_point():
            raise TypeError(f"{_OP}: q, k_cache, v_cache must share one floating dtype, got {q.dtype}, {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{_OP}: {name} is on {x.device} but q is on {q.device}")
    if not q.is_floating_point():
        raise TypeError(f"{_OP}: q must be floating point, got {q.dtype}")
    kv_axes = ((2, "heads Hkv"), (3, "head dim D")) if paged else ((0, "batch B"), (1, "heads Hkv"), (3, "head dim D"))
    for name, x, lgd, axes in (
        ("q", q, "[B, Hq, D]", ((0, "batch B"), (1, "heads Hq"), (2, "head dim D"))),
        ("k_cache", k_cache, legend, kv_axes),
    ):
        for axis, label in axes:
            if x.shape[axis] == 0:
                raise ValueError(f"{_OP}: {name} has {label} = 0 (shape {tuple(x.shape)} {lgd}); it must be >= 1")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{_OP}: k_cache and v_cache differ in shape: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}"
        )
    check_block_size(block_size, _OP)
    b, hq, d = q.shape
    if paged:
        _, page, hkv, dk = k_cache.shape
        _check_int32(block_table, "block_table", (b, None), "[B, max_pages]", q.device)
        # A page either holds whole key blocks or a whole number of pages fills a block (block_size is a
        # power of two, so the second case is a power-of-two page from 1 token up); anything else would
        # put a page boundary at a different offset in every block.
        if page % block_size and block_size % page:
            raise ValueError(
                f"{_OP}: the page size ({page} tokens) must be a multiple of block_size ({block_size}) or divide "
                f"it (a power of two from 1 to {block_size})"
            )
        capacity = block_table.shape[1] * page
    else:
        bk, hkv, capacity, dk = k_cache.shape
        if bk != b:
            raise ValueError(f"{_OP}: k_cache batch {bk} != q batch {b}")
    if dk != d:
        raise ValueError(f"{_OP}: q and k_cache head dims differ: {d} vs {dk}")
    if hq % hkv:
        raise ValueError(f"{_OP}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    _check_int32(cache_seqlens, "cache_seqlens", (b,), "[B]", q.device)
    _check_int32(block_indices, "block_indices", (b, hkv, None), "[B, Hkv, K]", q.device)
    if cache_starts is not None:
        if paged:
            raise ValueError(
                f"{_OP}: cache_starts take a contiguous cache only; a paged cache starts each sequence at its first "
                "page (block_table), so pass block_table without cache_starts"
            )
        _check_int32(cache_starts, "cache_starts", (b,), "[B]", q.device)
    if q.device.type == "cpu":  # data checks only where they cost no device sync
        nb = num_blocks(capacity, block_size)
        if bool(((cache_seqlens < 0) | (cache_seqlens > capacity)).any()):
            raise ValueError(f"{_OP}: cache_seqlens must lie in [0, {capacity}], got {cache_seqlens.tolist()}")
        if cache_starts is not None and bool(((cache_starts < 0) | (cache_starts + cache_seqlens > capacity)).any()):
            raise ValueError(
                f"{_OP}: each sequence must lie in its cache row: 0 <= cache_starts and cache_starts + cache_seqlens "
                f"<= {capacity}, got cache_starts {cache_starts.tolist()} and cache_seqlens {cache_seqlens.tolist()}"
            )
        idx = block_indices
        if bool(((idx < -1) | (idx >= nb)).any()):
            raise ValueError(f"{_OP}: block_indices must be -1 (padding) or in [0, {nb}) for a {capacity}-token cache")
        srt = idx.sort(-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
            raise ValueError(f"{_OP}: block_indices repeats a block in one (sequence, KV head) list")
        if paged and bool(((block_table < 0) | (block_table >= k_cache.shape[0])).any()):
            raise ValueError(f"{_OP}: block_table entries must be page ids in [0, {k_cache.shape[0]})")
    return capacity


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
    impl: str | None = None,
    cache_starts: torch.Tensor | None = None,
):
    """Attention of one new query token per sequence over the selected key blocks of the KV cache.

    Args:
        q: [B, Hq, D], the query of the token at position ``cache_seqlens[b] - 1`` of its sequence (its K/V
            already appended to the cache).
        k_cache, v_cache: contiguous [B, Hkv, Tmax, D] (the layout of transformers' caches), or paged
            [P, page, Hkv, D] together with ``block_table``.
        cache_seqlens: int32 [B], tokens in each sequence's cache, the new one included (sequences
            of different lengths in one batch).
        block_indices: int32 [B, Hkv, K], the key blocks each (sequence, KV head) attends to, in any
            order, without repeats, -1 for unused slots. Keys at or past ``cache_seqlens[b]`` are
            masked: the current, partial block attends only to the tokens it has. K is static (a token
            budget / block size), so shapes do not change from step to step.
        block_size: tokens per key block (power of two; the Triton kernel takes 16..128).
        block_table: int32 [B, max_pages] page ids (paged layout only). The page size is a multiple
            of ``block_size`` or divides it (1, 2, ..., ``block_size`` tokens: vLLM's 16, SGLang's 1), so
            a key block may span several pages.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return lse [B, Hq] fp32 (-inf where nothing is selected).
        impl: ``"reference"`` (eager, any device, fp64-capable), ``"triton"`` (split-KV kernel with an
            LSE merge; no host syncs, CUDA-graph friendly) or None (``"triton"`` on CUDA, else
            ``"reference"``). An explicit ``impl`` never falls back.
        cache_starts: int32 [B] or None (contiguous cache only): sequence b begins at token
            ``cache_starts[b]`` of its cache row (a left-padded batch keeps pad keys before it). Its tokens
            are ``k_cache[b, :, cache_starts[b] : cache_starts[b] + cache_seqlens[b]]``, and key block J of
            ``block_indices`` covers its tokens ``[J * block_size, (J + 1) * block_size)`` counted from that
            start: each sequence keeps the block phase it has alone. None: every sequence starts at token 0
            (the kernel compiled without the offset, so it costs nothing).

    Returns:
        out [B, Hq, D] in q's dtype (zeros where nothing is selected), and lse if ``return_lse``.
        Not differentiable through ``impl="triton"`` (it raises when gradients are required).

    On CPU tensors the contents of ``cache_seqlens``, ``block_indices``, ``block_table`` and ``cache_starts``
    are checked too (range, repeats); on CUDA they are not read (no host synchronisation).
    """
    from . import resolve_impl

    _validate(q, k_cache, v_cache, cache_seqlens, block_indices, block_size, block_table, cache_starts)
    impl = resolve_impl(impl, q.device, _OP, allowed=("reference", "triton"))
    if impl == "reference":
        return reference.sparse_decode_attention(
            q, k_cache, v_cache, cache_seqlens, block_indices, block_size,
            block_table=block_table, scale=scale, return_lse=return_lse, cache_starts=cache_starts,
        )  # fmt: skip
    from ._triton import _check, _needs_grad, _scale
    from ._triton.decode_fwd import sparse_decode_fwd

    q, k_cache, v_cache = _check(q, k_cache, v_cache, block_size, _OP)
    if _needs_grad(q, k_cache, v_cache):
        raise NotImplementedError(
            f"{_OP} (triton) has no backward: call it under torch.no_grad() (decode is inference) or use "
            "impl='reference' for gradients"
        )
    out, lse = sparse_decode_fwd(
        q, k_cache, v_cache, cache_seqlens, block_indices, block_size, _scale(q.shape[-1], scale),
        block_table=block_table, return_lse=return_lse, cache_starts=cache_starts,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def budget_decode_blocks(
    qg: torch.Tensor,
    keys: torch.Tensor,
    cache_seqlens: torch.Tensor,
    num_slots: int,
    block_size: int,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode-gate logits and the token-budget block lists of one decode step, in one Triton launch.

    The same blocks as ``select_decode_blocks(logits, cache_seqlens, DecodePolicy("budget", K * block_size),
    block_size)`` on the logits of :meth:`seerattn.gate.DecodeGate.scores` (``qg . kg / sqrt(Dg)`` over the
    completed blocks ``J < (cache_seqlens[b] - 1) // block_size``): the first and the current block when
    the cache has tokens (and the completed blocks listed in ``forced``), then the highest-logit completed blocks,
    K in all. Only the order differs:
    ascending block index here (:mod:`seerattn.ops._triton.decode_select`). Ties go to the lower block index.
    The policy-level entry is :func:`seerattn.decode_policy.select_decode_blocks_fused`.

    Args:
        qg: [B, Hkv, Dg] gate queries of the new tokens (:meth:`DecodeGate.gate_query`, rotated at
            ``cache_seqlens - 1``).
        keys: [B, Hkv, NB, Dg] cached gate keys (:attr:`GateKeyCache.keys`); rows of blocks that are not
            completed are not read.
        cache_seqlens: int32 / int64 [B], tokens in each cache, the new one included; at most
            ``NB * block_size``.
        num_slots: K >= 1 (a token budget / block size).
        block_size: tokens per key block (power of two).
        forced: int32 / int64 [B, Hkv, M] (M <= 16) more blocks kept like the first and the current one where they are
            completed (``DecodePolicy.bound_slots``' picks); -1 or any other index outside them: none. None: M = 0.

    Returns:
        int32 [B, Hkv, K]: kept blocks in ascending order, then -1 padding.

    Triton only (CUDA, or CPU under ``TRITON_INTERPRET=1``); no host synchronisation on CUDA, where the
    contents of ``cache_seqlens`` are not checked. Not differentiable (indices).
    """
    op = "budget_decode_blocks"
    for name, x, dims, legend in (("qg", qg, 3, "[B, Hkv, Dg]"), ("keys", keys, 4, "[B, Hkv, NB, Dg]")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != dims or 0 in x.shape:
            raise ValueError(f"{op}: {name} must be a non-empty {dims}-D {legend}, got shape {tuple(x.shape)}")
    b, hkv, nb, dg = keys.shape
    if tuple(qg.shape) != (b, hkv, dg):
        raise ValueError(
            f"{op}: qg must be [B, Hkv, Dg] = {[b, hkv, dg]} for keys {tuple(keys.shape)}, got {tuple(qg.shape)}"
        )
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cache_seqlens must be an int32 or int64 tensor [B]")
    if tuple(cache_seqlens.shape) != (b,):
        raise ValueError(f"{op}: cache_seqlens must be [B] = [{b}], got {tuple(cache_seqlens.shape)}")
    for name, x in (("qg", qg), ("cache_seqlens", cache_seqlens)):
        if x.device != keys.device:
            raise ValueError(f"{op}: {name} is on {x.device} but keys are on {keys.device}")
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"{op}: num_slots must be an int >= 1, got {num_slots!r}")
    check_block_size(block_size, op)
    from ._triton.config import check_device

    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    check_device(qg, op, floats)
    check_device(keys, op, floats)
    if keys.device.type == "cpu" and bool(((cache_seqlens < 0) | (cache_seqlens > nb * block_size)).any()):
        raise ValueError(
            f"{op}: cache_seqlens must lie in [0, NB * block_size = {nb * block_size}], got {cache_seqlens.tolist()}"
        )
    if forced is not None:
        ok = isinstance(forced, torch.Tensor) and forced.dtype in (torch.int32, torch.int64)
        if not ok or forced.dim() != 3 or tuple(forced.shape[:2]) != (b, hkv) or not 1 <= forced.shape[2] <= 16:
            raise ValueError(
                f"{op}: forced must be an int32 / int64 [B, Hkv, M] = [{b}, {hkv}, 1..16] tensor, got "
                f"{getattr(forced, 'dtype', type(forced).__name__)} {tuple(getattr(forced, 'shape', ()))}"
            )
        if forced.device != keys.device:
            raise ValueError(f"{op}: forced is on {forced.device} but keys are on {keys.device}")
    from ._triton.decode_select import decode_budget_select_fwd

    return decode_budget_select_fwd(qg, keys, cache_seqlens, num_slots, block_size, forced)


def quest_bound_scores(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Quest's bound of ``q . k`` per key block, max over each KV group's query heads, in one Triton launch: the
    scores ``DecodePolicy.bound_slots`` ranks (:func:`seerattn.decode_policy.bound_block_picks`).

    Its eager reference is :func:`seerattn.decode_baselines.quest_block_scores` (``q . mid + |q| . half``, two
    matmuls); here ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` in fp32 (the same value up to rounding), reading the
    bounds of the rows' ranked blocks only, without fp32 copies of them.

    Args:
        q: [B, Hq, N, D] fp16 / bf16 / fp32 query rows (post-RoPE); Hq a multiple of Hkv.
        kmin, kmax: [B, Hkv, NB, D] each block's element-wise key min / max (:class:`seerattn.gate.BlockBounds`),
            one dtype and one stride layout.
        cache_seqlens: int32 / int64 [B, N] keys visible to each row (its position + 1).
        block_size: tokens per key block (power of two).

    Returns:
        fp32 [B, Hkv, N, NB]: the bound of the completed blocks ``1 <= J < (cache_seqlens - 1) // block_size``, -inf
        elsewhere (the first block is always kept, the current one is not ranked).

    Triton only (CUDA, or CPU under ``TRITON_INTERPRET=1``); no host synchronisation on CUDA.
    """
    op = "quest_bound_scores"
    for name, x in (("q", q), ("kmin", kmin), ("kmax", kmax), ("cache_seqlens", cache_seqlens)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4 or kmin.dim() != 4 or 0 in q.shape or 0 in kmin.shape:
        raise ValueError(
            f"{op}: q must be a non-empty [B, Hq, N, D] and kmin [B, Hkv, NB, D], got {tuple(q.shape)}, "
            f"{tuple(kmin.shape)}"
        )
    b, hq, n, d = q.shape
    hkv = kmin.shape[1]
    if kmin.shape[0] != b or kmin.shape[3] != d or hq % hkv:
        raise ValueError(f"{op}: kmin {tuple(kmin.shape)} must be [B={b}, Hkv, NB, D={d}] with Hkv dividing Hq={hq}")
    if kmax.shape != kmin.shape or kmax.stride() != kmin.stride() or kmax.dtype != kmin.dtype:
        raise ValueError(f"{op}: kmax must match kmin in shape, strides and dtype")
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (b, n):
        raise ValueError(
            f"{op}: cache_seqlens must be an int32 / int64 [B, N] = [{b}, {n}] tensor, got {cache_seqlens.dtype} "
            f"{tuple(cache_seqlens.shape)}"
        )
    for name, x in (("q", q), ("kmax", kmax), ("cache_seqlens", cache_seqlens)):
        if x.device != kmin.device:
            raise ValueError(f"{op}: {name} is on {x.device} but kmin is on {kmin.device}")
    check_block_size(block_size, op)
    from ._triton.config import check_device
    from ._triton.decode_select import bound_scores_fwd

    floats = (torch.float16, torch.bfloat16, torch.float32)
    check_device(q, op, floats)
    check_device(kmin, op, floats)
    return bound_scores_fwd(q, kmin, kmax, cache_seqlens, block_size)


def top_block_indices(scores: torch.Tensor, slots: int) -> torch.Tensor:
    """The ``slots`` highest finite entries of each row, in one Triton launch: what ``scores.topk(slots)`` picks, -1
    where a row has fewer finite-or-+inf entries above -inf; equal values go to the lower index (``topk`` leaves
    their order unspecified). With :func:`quest_bound_scores`, the picks of ``DecodePolicy.bound_slots``.

    Args:
        scores: fp32 [..., NB] (NB >= 1; NaN not detected).
        slots: M, 1 <= M <= 16.

    Returns:
        int32 [..., M]: indices by descending score, then -1.

    Triton only (CUDA, or CPU under ``TRITON_INTERPRET=1``); no host synchronisation on CUDA.
    """
    op = "top_block_indices"
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() < 1 or 0 in scores.shape:
        raise ValueError(
            f"{op}: scores must be a non-empty fp32 tensor [..., NB], got {getattr(scores, 'dtype', scores)}"
        )
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 16:
        raise ValueError(f"{op}: slots must be an int in [1, 16], got {slots!r}")
    from ._triton.config import check_device
    from ._triton.decode_select import top_fwd

    check_device(scores, op, (torch.float32,))
    return top_fwd(scores.contiguous(), slots)
