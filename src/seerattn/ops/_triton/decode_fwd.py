"""Sparse decode attention: one new query token per sequence over the selected key blocks of its cache.

Algorithm
---------
Split-KV FlashDecoding over index lists. A program owns one (sequence, KV head) and one split: a
contiguous run of ``SLOTS`` entries of that pair's list ``block_indices[b, h, :]``. It loads the query
vectors of the whole GQA group (``GROUP`` heads, padded to ``G_PAD >= 16`` rows for ``tl.dot``) once,
then walks its entries: each K/V block is loaded once for all heads of the group (GQA-native, no
repeated K/V), ``BLOCK_N`` keys per step (``BLOCK_SIZE / BLOCK_N`` steps per block), online softmax in
the log2 domain. Padding entries (-1) and keys at or past ``cache_seqlens[b]`` (the current, partial
block; blocks past the end) are masked, so their loads are skipped. With one split the program
writes the output directly; with several, each writes its normalised partial output and its
log-sum-exp (fp32) and a second kernel merges them per query head (LSE merge). A split or a whole
list with nothing kept gives a zero partial and lse -inf, never NaN.

The number of splits depends only on shapes (B, Hkv, K and the number of SMs), never on the data: no
host synchronisation, static shapes per budget, so a decode step can be captured in a CUDA graph.

Layouts
-------
q ``[B, Hq, D]`` (unit last stride); contiguous cache ``[B, Hkv, Tmax, D]``, or paged cache
``[P, page, Hkv, D]`` with ``block_table`` int32 ``[B, max_pages]`` (token ``t`` of sequence ``b`` in
page ``block_table[b, t // page]``). The page is a multiple of ``BLOCK_SIZE`` or divides it (a power of
two from 1 token: vLLM's default page is 16, SGLang's 1), so one of ``page`` and ``BLOCK_N`` (a power of
two dividing ``BLOCK_SIZE``) divides the other: with ``page >= BLOCK_N`` a step's keys lie in one page
and the step loads one page id; with ``page < BLOCK_N`` the step spans ``BLOCK_N / page`` pages and loads
one page id per key row (gathered from the block table, ``BLOCK_N`` int32 per step, one step ahead like
the single id). The per-row ids are a compile-time branch: the contiguous and ``page >= BLOCK_N`` kernels
are the code they were before it (same sm_90 PTX, compared offline);
``cache_seqlens`` int32 ``[B]``; ``block_indices`` int32 ``[B, Hkv, K]``, -1 padded, no duplicates.
Optional ``cache_starts`` int32 ``[B]`` (contiguous cache only): sequence ``b`` begins at token
``cache_starts[b]`` of its cache row (a left-padded batch: pad keys before it), and its blocks and
lengths count from there, as if the row began at that token. It offsets the row's token index by one
scalar loaded per program; ``HAS_STARTS`` is a compile-time flag, so without starts the kernel is the
code it was before.
Out ``[B, Hq, D]`` in q's dtype, lse ``[B, Hq]`` fp32 natural log. Offsets into q, K/V, the outputs
and the scratch are int64.

Supported: fp16, bf16, fp32 (tf32 dots on the GPU; exact under the interpreter); head dims 16..128
(powers of two); block sizes 16, 32, 64, 128. Limitations: forward only (inference); one query token
per sequence (no speculative multi-token decode yet). Measured on an H200 (contiguous cache, tree of
commit 3fc8061: docs/experiments/decode/README.md), not tuned beyond ``decode_configs``; the paged
layout has not been timed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LN2, LOG2E
from .config import KernelConfig, interpreting, num_sms, pick_config

__all__ = ["decode_configs", "num_decode_splits", "sparse_decode_fwd"]


@triton.jit
def _page_of(table_row, blk, s, MAX_PAGES, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, KPB: tl.constexpr,
             PAGE: tl.constexpr, PAGED: tl.constexpr):  # fmt: skip
    """Page id(s) holding step ``s``'s keys of block ``blk`` (0 for padding, or without paging): one
    scalar when the step lies inside one page (``PAGE >= BLOCK_N``), else one per key row, ``[BLOCK_N]``
    (the step spans ``BLOCK_N // PAGE`` pages)."""
    if PAGED:
        tok0 = blk * BLOCK_SIZE + (s % KPB) * BLOCK_N
        if PAGE >= BLOCK_N:
            page_slot = tok0 // PAGE
            return tl.load(table_row + page_slot, mask=(blk >= 0) & (page_slot < MAX_PAGES), other=0)
        else:
            tok = tok0 + tl.arange(0, BLOCK_N)
            # tok >= 0 <=> blk >= 0 (padding); a tensor comparison, not a scalar & tensor mask (see below)
            row_ok = (tok >= 0) & (tok < MAX_PAGES * PAGE)
            return tl.load(table_row + tl.where(row_ok, tok // PAGE, 0), mask=row_ok, other=0)
    else:
        return blk * 0


@triton.jit
def _decode_split_kernel(
    Q, K, V, Out, Lse, OPart, LPart, Idx, SeqLens, Starts, Table,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh,
    stride_ib, stride_ih,
    stride_tb,
    HKV, K_SLOTS, SLOTS, MAX_PAGES,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, SPLIT: tl.constexpr,
    STORE_LSE: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split). Contiguous cache: ``stride_kb`` is the batch stride and
    ``stride_kt`` the token stride; paged: ``stride_kb`` is the page stride, ``stride_kt`` the stride
    of a token inside a page. ``HAS_STARTS`` (contiguous only): key position ``kpos`` of sequence b is
    token ``Starts[b] + kpos`` of its row."""
    KPB: tl.constexpr = BLOCK_SIZE // BLOCK_N  # steps per key block
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    seqlen = tl.load(SeqLens + b)
    if HAS_STARTS:
        start = tl.load(Starts + b).to(tl.int64)
    else:
        start = 0

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GROUP
    head = h * GROUP + offs_g  # int64: the group's query heads
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    KH = K + h * stride_kh
    VH = V + h * stride_vh
    idx_ptr = Idx + b * stride_ib + h * stride_ih

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)

    slot0 = sp * SLOTS
    n_steps = (tl.minimum(slot0 + SLOTS, K_SLOTS) - slot0) * KPB
    # The entry of the next step is loaded one step ahead and carried through the loop, so the K/V
    # addresses come from a loop-carried value and the pipeliner can keep copies in flight (an index
    # load feeding the copies of its own step cost ~0.6 us per step in the block-sparse forward).
    blk = tl.load(idx_ptr + slot0, mask=n_steps > 0, other=-1)
    page = _page_of(Table + b * stride_tb, blk, 0, MAX_PAGES, BLOCK_SIZE, BLOCK_N, KPB, PAGE, PAGED)
    for s in range(0, n_steps):
        nxt = tl.load(idx_ptr + slot0 + (s + 1) // KPB, mask=s + 1 < n_steps, other=-1)
        # the page of the next step too (one id, or one per key row when the step spans pages): a page id
        # loaded in its own step made the paged loop wait for every copy at the top of each step (offline
        # sm_90 TTGIR: async_wait num = 0)
        nxt_page = _page_of(Table + b * stride_tb, nxt, s + 1, MAX_PAGES, BLOCK_SIZE, BLOCK_N, KPB, PAGE, PAGED)
        tok0 = blk * BLOCK_SIZE + (s % KPB) * BLOCK_N
        kpos = tok0 + offs_n
        # blk >= 0 <=> kpos >= 0 (padding slots hold -1); written as a comparison of the key positions so
        # that both operands are tensors (a scalar & tensor mask comes out int32 in Triton 3.9's interpreter)
        col_ok = (kpos >= 0) & (kpos < seqlen)
        if PAGED:
            if PAGE >= BLOCK_N:  # ``page`` is one id; the step's rows are consecutive inside it
                in_page = tl.where(col_ok, tok0 % PAGE + offs_n, 0).to(tl.int64)
            else:  # ``page`` holds each row's own page id
                in_page = tl.where(col_ok, kpos % PAGE, 0).to(tl.int64)
            k_rows = page.to(tl.int64) * stride_kb + in_page * stride_kt
            v_rows = page.to(tl.int64) * stride_vb + in_page * stride_vt
        else:
            tok = tl.where(col_ok, kpos + start, 0).to(tl.int64)
            k_rows = b * stride_kb + tok * stride_kt
            v_rows = b * stride_vb + tok * stride_vt
        k = tl.load(KH + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k))
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Nothing kept yet on a row: subtract 0 instead of -inf (exp2(-inf) = 0, never NaN).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(qk - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VH + v_rows[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        blk = nxt
        page = nxt_page

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))  # log2 domain
    if SPLIT:
        p_ptrs = OPart + b * stride_pb + head[:, None] * stride_ph + sp * stride_ps + offs_d[None, :]
        tl.store(p_ptrs, out, mask=g_ok[:, None])
        tl.store(LPart + b * stride_sb + head * stride_sh + sp, lse2, mask=g_ok)
    else:
        o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None])
        if STORE_LSE:
            tl.store(Lse + b * stride_lb + head * stride_lh, lse2 * LN2, mask=g_ok)


@triton.jit
def _decode_merge_kernel(
    OPart, LPart, Out, Lse,
    stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    HQ, NSPLIT,
    S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, STORE_LSE: tl.constexpr,
):  # fmt: skip
    """LSE merge of the splits of one (sequence, query head)."""
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    hq = (pid % HQ).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NSPLIT
    lse = tl.load(LPart + b * stride_sb + hq * stride_sh + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_sub)  # 0 for empty splits
    total = tl.sum(w, 0)
    o = tl.load(
        OPart + b * stride_pb + hq * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=s_ok[:, None], other=0.0,
    )  # fmt: skip
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + hq * stride_oh + offs_d, out.to(Out.dtype.element_ty))
    if STORE_LSE:
        lse_out = tl.where(
            total == 0.0, float("-inf"), (m_sub + tl.math.log2(tl.where(total == 0.0, 1.0, total))) * LN2
        )
        tl.store(Lse + b * stride_lb + hq * stride_lh, lse_out)


def decode_configs(block_size: int) -> list[KernelConfig]:
    """Candidates (first = untuned default). ``block_m`` is unused (the group size decides the rows);
    ``block_n`` keys per step divides the block size."""
    if interpreting():
        return [KernelConfig(16, min(block_size, 32), 1, num_warps=4, num_stages=1)]
    bn = min(block_size, 64)
    # Decode is bandwidth bound: deeper pipelines keep more K/V copies in flight. Not measured yet.
    return [
        KernelConfig(16, bn, 1, 4, 3),
        KernelConfig(16, bn, 1, 4, 2),
        KernelConfig(16, min(block_size, 32), 1, 4, 4),
    ]


def num_decode_splits(batch: int, kv_heads: int, slots: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): enough programs for ~2 per SM, at least 2 list entries per
    split. Depends on shapes only (no host sync)."""
    if slots <= 1:
        return 1
    want = -(-2 * num_sms(device) // max(batch * kv_heads, 1))
    return max(1, min(want, slots // 2))


def sparse_decode_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    scale: float,
    block_table: torch.Tensor | None = None,
    return_lse: bool = True,
    num_splits: int | None = None,
    config: KernelConfig | None = None,
    cache_starts: torch.Tensor | None = None,
):
    """Launch the decode kernels (inputs already validated by :func:`seerattn.ops.sparse_decode_attention`).

    q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, Tmax, D] or paged [P, page, Hkv, D] with ``block_table``
    int32 [B, max_pages]; cache_seqlens int32 [B]; block_indices int32 [B, Hkv, K]; cache_starts int32 [B]
    or None (contiguous cache only: each sequence's first token in its row). ``num_splits`` and
    ``config`` force a choice (tests, benchmarks). Returns out [B, Hq, D] and lse [B, Hq] fp32 (None
    unless ``return_lse``).
    """
    b, hq, d = q.shape
    paged = block_table is not None
    hkv = k_cache.shape[2] if paged else k_cache.shape[1]
    group = hq // hkv
    slots = block_indices.shape[-1]
    block_indices = block_indices.contiguous()
    cache_seqlens = cache_seqlens.contiguous()
    has_starts = cache_starts is not None
    if has_starts and paged:
        raise ValueError("sparse_decode_fwd: cache_starts apply to a contiguous cache only (paged: the block table)")
    starts = cache_starts.contiguous() if has_starts else cache_seqlens  # dummy pointer, never read without starts
    nsplit = num_decode_splits(b, hkv, slots, q.device) if num_splits is None else int(num_splits)
    nsplit = max(1, min(nsplit, max(slots, 1)))
    per_split = -(-slots // nsplit) if slots else 0
    nsplit = -(-slots // per_split) if slots else 1  # no split without entries
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq), dtype=torch.float32, device=q.device) if return_lse else None
    lse_arg = lse if lse is not None else out  # never written when STORE_LSE is False
    split = nsplit > 1
    if split:
        opart = torch.empty((b, hq, nsplit, d), dtype=torch.float32, device=q.device)
        lpart = torch.empty((b, hq, nsplit), dtype=torch.float32, device=q.device)
    else:
        opart, lpart = out.new_empty((1, 1, 1, 1), dtype=torch.float32), out.new_empty((1, 1, 1), dtype=torch.float32)
    if paged:
        table = block_table.contiguous()
        page = k_cache.shape[1]
        ks = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
        vs = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        max_pages = table.shape[1]
    else:
        table = cache_seqlens  # dummy pointer, never read
        page = block_size
        ks = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        vs = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
        max_pages = 0
    g_pad = max(16, triton.next_power_of_2(group))

    def launch(cfg: KernelConfig):
        _decode_split_kernel[(b * hkv, nsplit)](
            q, k_cache, v_cache, out, lse_arg, opart, lpart, block_indices, cache_seqlens, starts, table,
            scale * LOG2E,
            q.stride(0), q.stride(1),
            *ks, *vs,
            out.stride(0), out.stride(1),
            lse_arg.stride(0), lse_arg.stride(1),
            opart.stride(0), opart.stride(1), opart.stride(2),
            lpart.stride(0), lpart.stride(1),
            block_indices.stride(0), block_indices.stride(1),
            table.stride(0),
            hkv, slots, per_split, max_pages,
            GROUP=group, G_PAD=g_pad, BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n, HEAD_DIM=d,
            PAGE=page, PAGED=paged, SPLIT=split, STORE_LSE=return_lse, HAS_STARTS=has_starts,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if split:
            _decode_merge_kernel[(b * hq,)](
                opart, lpart, out, lse_arg,
                opart.stride(0), opart.stride(1), opart.stride(2),
                lpart.stride(0), lpart.stride(1),
                out.stride(0), out.stride(1),
                lse_arg.stride(0), lse_arg.stride(1),
                hq, nsplit,
                S_PAD=triton.next_power_of_2(nsplit), HEAD_DIM=d, STORE_LSE=return_lse,
                num_warps=4,
            )  # fmt: skip

    if config is None:
        key = ("decode", block_size, group, d, q.dtype, paged, page, slots, nsplit, b * hkv, has_starts)
        config = pick_config(key, decode_configs(block_size), launch)
    launch(config)
    return out, lse
