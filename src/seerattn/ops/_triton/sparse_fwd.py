"""Block-sparse causal FlashAttention forward that walks lists of kept key blocks.

Algorithm
---------
FlashAttention-2 forward (online softmax in the log2 domain: ``log2(e)`` folded into the scale,
``exp2`` everywhere). A program owns a query tile of ``BLOCK_M = PACK * ROWS`` rows: ``PACK`` query
heads (of one GQA group, sharing one mask head) times ``ROWS`` consecutive query positions. It walks
the list of kept key blocks of its mask row (``kv_indices[b, h, I, :kv_num_blocks[b, h, I]]``),
never the mask bits, and loads each K/V tile once for all ``PACK`` heads. Three tile shapes:

- ``ROWS <= MB`` (``U == 1``): the tile lies inside one mask row (``MB / ROWS`` programs per row);
- ``ROWS == U * MB`` with ``U > 1`` ("union" tiles): the tile spans ``U`` consecutive mask rows of
  one head. A small pre-kernel merges their lists into one ascending list whose entries are
  ``J * 16 + flags`` (bit ``u`` set = mask row ``U*I' + u`` keeps block ``J``). Rows of the tile
  that do not keep a block are switched off per row (their running max is left alone and their
  probabilities are ``exp2(x - inf) = 0``), so no element-wise mask is needed off the diagonal.
  This gives 128-row tiles for 64-token mask blocks with per-query-head masks;
- ``PACK > 1``: per-group masks (mask heads = Hkv): the heads of one group share a program.

Key blocks strictly left of the tile's first row (the ascending prefix of the list with
``J < q_start // MB``) run without any masking; the rest (the diagonal, blocks above it, a partial
last block) run with the causal and length masks. ``BLOCK_N`` may split a mask block into several
steps (``BLOCK_N < MB``) or gather two mask blocks per step (``BLOCK_N == 2 * MB``, non-union only).

Program order (one 1-D grid): (batch, KV head) slowest, then the query tiles heaviest first (last
tiles first: the hardware scheduler runs the long causal rows first, longest-processing-time order,
and the short ones fill the tail), then the programs of that KV head (its query heads or head packs)
fastest. The programs in flight then read one KV head's K/V (16 MB at 32k for Llama-8B shapes) rather
than every head's (128 MB, more than the H200's L2): at 10 % the kernel is bound by its K/V block
loads (32 KB per kept block and query tile), so this order was 1.09x / 1.21x faster than "all heads
of one tile position together" on per-query-head random masks at 32k / 128k and 1.11x on structured
ones at 128k, level elsewhere (H200, docs/experiments/prefill/README.md, session 10).

Layouts
-------
q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` (any strides with a unit last stride); out
``[B, Hq, T, D]`` shaped, ``[B, T, Hq, D]`` in memory, like SDPA's flash backends (strides
``(T*Hq*D, D, Hq*D, 1)``: the ``out.transpose(1, 2).contiguous()`` of transformers' attention
functions is then free instead of a copy of the whole output); lse ``[B, Hq, T]`` fp32 natural-log,
-inf on rows with no kept key.
Varlen: B == 1, sequences packed along T, ``cu_seqlens`` int32 ``[N + 1]``, mask batch = N; each
sequence uses the top-left corner of its mask. Offsets are int64 (128k tokens x 32 heads x B).

Supported: fp16, bf16 (fp32 runs with tf32 dots on the GPU; exact under the interpreter); head dims
16, 32, 64, 128; mask block sizes 16, 32, 64, 128 (64 and 128 are the tuned ones).
Limitations: forward only; queries and keys at the same positions (prefill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LN2, LOG2E, count_below_from_end
from .config import KernelConfig, memo_mask_key, pick_config, sparse_configs

__all__ = ["block_sparse_attention_fwd", "build_union_lists"]


# ====================================================================== union lists
@triton.jit
def _union_lists_kernel(
    KvNum,
    KvIdx,
    UNum,
    UIdx,
    stride_nb,
    stride_nh,
    stride_ib,
    stride_ih,
    stride_iq,
    stride_ub,
    stride_uh,
    stride_uq,
    stride_vb,
    stride_vh,
    NQ,
    NK,
    HM,
    U: tl.constexpr,
    NKP: tl.constexpr,
):
    """Merge the kept-block lists of ``U`` consecutive mask rows into one ascending list of
    ``J * 16 + flags`` (flags: bit u = row ``U*t + u`` keeps J). One program per (b, h, t)."""
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = bh // HM
    h = bh % HM
    offs = tl.arange(0, NKP)
    flags = tl.zeros([NKP], dtype=tl.int32)
    for u in tl.static_range(U):
        qb = t * U + u
        row_ok = qb < NQ
        cnt = tl.load(KvNum + b * stride_nb + h * stride_nh + qb, mask=row_ok, other=0)
        in_list = offs < cnt
        idx = tl.load(KvIdx + b * stride_ib + h * stride_ih + qb * stride_iq + offs, mask=in_list, other=0)
        hist = tl.histogram(idx, NKP, mask=in_list)
        flags = flags | ((hist > 0).to(tl.int32) << u)
    kept = (flags != 0) & (offs < NK)
    pos = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(UIdx + b * stride_ub + h * stride_uh + t * stride_uq + pos, offs * 16 + flags, mask=kept)
    tl.store(UNum + b * stride_vb + h * stride_vh + t, tl.sum(kept.to(tl.int32), 0))


def build_union_lists(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, u: int):
    """Union lists of ``u`` consecutive mask rows (see the module docstring).

    kv_num_blocks: int32 [B, H, NQ]; kv_indices: int32 [B, H, NQ, NK] ->
    (num int32 [B, H, ceil(NQ / u)], entries int32 [B, H, ceil(NQ / u), NK]).
    """
    b, h, nq, nk = kv_indices.shape
    nqu = -(-nq // u)
    unum = torch.empty(b, h, nqu, dtype=torch.int32, device=kv_indices.device)
    uidx = torch.empty(b, h, nqu, nk, dtype=torch.int32, device=kv_indices.device)
    _union_lists_kernel[(b * h, nqu)](
        kv_num_blocks, kv_indices, unum, uidx,
        kv_num_blocks.stride(0), kv_num_blocks.stride(1),
        kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2),
        uidx.stride(0), uidx.stride(1), uidx.stride(2),
        unum.stride(0), unum.stride(1),
        nq, nk, h, U=u, NKP=triton.next_power_of_2(nk),
        num_warps=4,
    )  # fmt: skip
    return unum, uidx


# ====================================================================== main kernel
@triton.jit
def _load_entry(list_ptr, s, cnt, MB: tl.constexpr, BLOCK_N: tl.constexpr, BPS: tl.constexpr, KPB: tl.constexpr):
    """List entry (BPS == 1: a scalar) or entries (BPS > 1: one per key column) of step ``s``;
    0 past the end of the list."""
    if BPS == 1:
        slot = s // KPB
        entry = tl.load(list_ptr + slot, mask=slot < cnt, other=0)
    else:
        slot = s * BPS + tl.arange(0, BLOCK_N) // MB
        entry = tl.load(list_ptr + slot, mask=slot < cnt, other=0)
    return entry


@triton.jit
def _sparse_step(
    acc, l_i, m_i, entry, q, K0, V0, list_ptr, s, cnt, pos_m, sub_u, seqlen, qk_scale,
    stride_kt, stride_vt, offs_d,
    MB: tl.constexpr, BLOCK_N: tl.constexpr, BPS: tl.constexpr, KPB: tl.constexpr, U: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N-key step of the online softmax. MASKED adds the causal/length/list masks.

    ``entry`` (this step's list entry) was loaded one step earlier and the next step's entry is
    loaded here and returned: the K/V addresses then come from a loop-carried value, which lets
    the software pipeliner keep K/V copies in flight (an index load feeding the copies of the same
    iteration made it wait for every copy at the top of each step: +0.6 us per step on the H200).
    """
    offs_n = tl.arange(0, BLOCK_N)
    if BPS == 1:
        if U > 1:
            blk = entry >> 4
            flags = entry & 15
        else:
            blk = entry
        kpos = blk * MB + (s % KPB) * BLOCK_N + offs_n
        col_ok = kpos < seqlen
    else:
        slot_ok = s * BPS + offs_n // MB < cnt
        kpos = entry * MB + offs_n % MB
        col_ok = slot_ok & (kpos < seqlen)
    next_entry = _load_entry(list_ptr, s + 1, cnt, MB, BLOCK_N, BPS, KPB)
    kpos64 = kpos.to(tl.int64)
    k_ptrs = K0 + kpos64[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V0 + kpos64[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        keep = col_ok[None, :] & (kpos[None, :] <= pos_m[:, None])
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        blk_max = tl.max(qk, 1)
    else:
        blk_max = tl.max(qk, 1) * qk_scale
    if U > 1:
        # Rows whose mask row does not keep this block: leave m_i alone and subtract +inf so
        # that their probabilities are exactly 0 (no element-wise mask needed).
        row_keep = ((flags >> sub_u) & 1) != 0
        m_new = tl.where(row_keep, tl.maximum(m_i, blk_max), m_i)
        m_sub = tl.where(row_keep, m_new, float("inf"))
    else:
        m_new = tl.maximum(m_i, blk_max)
        m_sub = m_new
    if MASKED or U > 1:
        # A row with nothing kept so far has m = -inf: subtract 0 (exp2(-inf) = 0, never NaN).
        m_sub = tl.where(m_sub == float("-inf"), 0.0, m_sub)
        alpha = tl.where(m_new == float("-inf"), 1.0, tl.math.exp2(m_i - m_new))
    else:
        alpha = tl.math.exp2(m_i - m_new)
    if MASKED:
        p = tl.math.exp2(qk - m_sub[:, None])
    else:
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new, next_entry


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, Out, Lse, LNum, LIdx, CuSeq,
    qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_iq,
    seq_len, n_tiles, HM, HEADS_PER_MASK, GROUP, KV_PROGRAMS,
    PACK: tl.constexpr, ROWS: tl.constexpr, U: tl.constexpr,
    MB: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr, STORE_LSE: tl.constexpr, TAIL: tl.constexpr = 4,
):  # fmt: skip
    BLOCK_M: tl.constexpr = PACK * ROWS
    PACKS = HEADS_PER_MASK // PACK
    BPS: tl.constexpr = BLOCK_N // MB if BLOCK_N > MB else 1  # mask blocks per step
    KPB: tl.constexpr = MB // BLOCK_N if BLOCK_N < MB else 1  # steps per mask block

    # (batch, KV head) slowest, query tiles heaviest first, the KV head's KV_PROGRAMS programs fastest (module doc)
    pid = tl.program_id(0)
    r = pid // KV_PROGRAMS
    pid0 = (r // n_tiles) * KV_PROGRAMS + pid % KV_PROGRAMS  # (batch, mask head, head pack)
    tile = n_tiles - 1 - r % n_tiles
    pk = pid0 % PACKS
    bh = pid0 // PACKS
    b = bh // HM
    hm = bh % HM

    if VARLEN:
        s0 = tl.load(CuSeq + b)
        seqlen = tl.load(CuSeq + b + 1) - s0
        tb = b * 0  # packed sequences live in batch 0
    else:
        s0 = b * 0
        seqlen = seq_len
        tb = b
    q_start = tile * ROWS
    if q_start >= seqlen:
        return
    if U > 1:
        list_row = tile  # union list row
    else:
        list_row = q_start // MB
    h0 = hm * HEADS_PER_MASK + pk * PACK  # first query head of the program
    kvh = h0 // GROUP

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    head_m = h0 + offs_m // ROWS
    local = offs_m % ROWS
    pos_m = q_start + local
    sub_u = local // MB  # which mask row of a union tile
    row_ok = pos_m < seqlen
    tok_m = (s0 + pos_m).to(tl.int64)

    q_ptrs = (
        Q + tb.to(tl.int64) * stride_qb + head_m.to(tl.int64)[:, None] * stride_qh
        + tok_m[:, None] * stride_qt + offs_d[None, :]
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    K0 = K + tb.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + s0.to(tl.int64) * stride_kt
    V0 = V + tb.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + s0.to(tl.int64) * stride_vt

    num_ptr = LNum + b.to(tl.int64) * stride_nb + hm.to(tl.int64) * stride_nh + list_row
    list_ptr = LIdx + b.to(tl.int64) * stride_ib + hm.to(tl.int64) * stride_ih + list_row.to(tl.int64) * stride_iq
    cnt = tl.load(num_ptr)

    # Ascending list: entries with J < jf are fully visible to every row of the tile (no mask);
    # the others (diagonal, above it) trail the list (policies give at most U of them).
    jf = q_start // MB
    LIST_SHIFT: tl.constexpr = 4 if U > 1 else 0  # union entries are J * 16 + flags
    n_full = count_below_from_end(list_ptr, cnt, jf, LIST_SHIFT, TAIL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    full_steps = (n_full // BPS) * KPB
    # Slot 0 always exists in memory: loading it unmasked lets it overlap the count/tail loads.
    if BPS == 1:
        entry = tl.load(list_ptr)
    else:
        entry = tl.load(list_ptr + tl.arange(0, BLOCK_N) // MB, mask=tl.arange(0, BLOCK_N) // MB < cnt, other=0)
    for s in range(0, full_steps):
        acc, l_i, m_i, entry = _sparse_step(
            acc, l_i, m_i, entry, q, K0, V0, list_ptr, s, cnt, pos_m, sub_u, seqlen, qk_scale,
            stride_kt, stride_vt, offs_d, MB, BLOCK_N, BPS, KPB, U, False,
        )  # fmt: skip
    all_steps = tl.cdiv(cnt, BPS) * KPB
    for s in range(full_steps, all_steps):
        acc, l_i, m_i, entry = _sparse_step(
            acc, l_i, m_i, entry, q, K0, V0, list_ptr, s, cnt, pos_m, sub_u, seqlen, qk_scale,
            stride_kt, stride_vt, offs_d, MB, BLOCK_N, BPS, KPB, U, True,
        )  # fmt: skip

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = (
        Out + tb.to(tl.int64) * stride_ob + head_m.to(tl.int64)[:, None] * stride_oh
        + tok_m[:, None] * stride_ot + offs_d[None, :]
    )  # fmt: skip
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        log_l = tl.math.log2(tl.where(empty, 1.0, l_i))
        lse = tl.where(empty, float("-inf"), (m_i + log_l) * LN2)
        l_ptrs = Lse + tb.to(tl.int64) * stride_lb + head_m.to(tl.int64) * stride_lh + tok_m
        tl.store(l_ptrs, lse, mask=row_ok)


# ====================================================================== launcher
def _tile_shape(cfg: KernelConfig, mask_block: int, heads_per_mask: int) -> tuple[int, int]:
    """(ROWS, U) of a config; raises ValueError when the config cannot serve this mask."""
    rows = cfg.block_m // cfg.pack
    if cfg.block_m % cfg.pack or heads_per_mask % cfg.pack or rows < 16:
        raise ValueError(f"config {cfg.short()}: pack must divide the heads per mask ({heads_per_mask})")
    if rows <= mask_block:
        if mask_block % rows:
            raise ValueError(f"config {cfg.short()}: rows {rows} must divide the mask block {mask_block}")
        u = 1
    else:
        if rows % mask_block or rows // mask_block > 4:
            raise ValueError(f"config {cfg.short()}: rows {rows} must be 2 or 4 mask blocks ({mask_block})")
        u = rows // mask_block
    bn = cfg.block_n
    if bn < 16 or bn & (bn - 1) or (bn > mask_block and (u > 1 or bn != 2 * mask_block)):
        raise ValueError(
            f"config {cfg.short()}: block_n must divide the mask block {mask_block} (or be twice it "
            "without union tiles)"
        )
    return rows, u


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    mask_block: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = True,
    config: KernelConfig | None = None,
    mask_source: tuple | None = None,
    mask_memo: dict | None = None,
):
    """Launch the block-sparse forward (inputs already validated by the caller).

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]; kv_num_blocks int32 [Bm, Hm, NQ]; kv_indices int32
    [Bm, Hm, NQ, NK] with Hm in (Hq, Hkv). ``config`` forces a configuration (benchmarks, tests).
    ``mask_source`` (:attr:`seerattn.BlockMask.source`) keys the tuned choice with the mask's kind
    (:func:`.config.mask_key`); ``mask_memo`` (:attr:`seerattn.BlockMask.memo`) keeps that key with the
    mask, so a mask without a policy source is measured once, not on every call.
    Returns out [B, Hq, T, D] shaped, [B, T, Hq, D] in memory (``out.transpose(1, 2)`` is contiguous),
    and lse [B, Hq, T] fp32 (None when not ``return_lse``).
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    bm, hm, nq, _ = kv_indices.shape
    group = hq // hkv
    heads_per_mask = hq // hm
    kv_num_blocks = kv_num_blocks.contiguous()
    kv_indices = kv_indices.contiguous()
    # [B, T, Hq, D] memory (see Layouts): the kernel writes through the strides of the [B, Hq, T, D] view
    out = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b, hq, t), dtype=torch.float32, device=q.device) if return_lse else None
    lse_arg = lse if lse is not None else out  # never written when STORE_LSE is False
    qk_scale = scale * LOG2E
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else kv_num_blocks  # dummy pointer when not varlen
    max_len = t if not varlen else int(mask_block * nq)

    # why the warp-specialised Hopper kernel cannot run this call (None: it can), looked at once per call: it decides
    # whether the tuner is offered that kernel and refuses a config forcing it
    hopper_refusal = "needs an sm_90 (Hopper) GPU"  # what sparse_fwd_ws.supported says off CUDA
    if q.is_cuda:
        from . import sparse_fwd_ws

        hopper_refusal = sparse_fwd_ws.supported(q, k, v, mask_block, hm)

    def launch(cfg: KernelConfig):
        if cfg.hopper_ws:
            if hopper_refusal is not None:
                raise ValueError(f"config {cfg.short()}: the warp-specialised Hopper kernel {hopper_refusal}")
            sparse_fwd_ws.launch(
                q, k, v, out, lse, kv_num_blocks, kv_indices, scale, mask_block, cfg.block_n, cu_seqlens=cu_seqlens,
                union=cfg.union,
            )  # fmt: skip
            return
        rows, u = _tile_shape(cfg, mask_block, heads_per_mask)
        if u > 1:
            lnum, lidx = build_union_lists(kv_num_blocks, kv_indices, u)
        else:
            lnum, lidx = kv_num_blocks, kv_indices
        n_tiles = triton.cdiv(min(max_len, nq * mask_block), rows)
        programs = bm * hm * (heads_per_mask // cfg.pack)  # per query tile: (batch, mask head, head pack)
        # programs that read one KV head: consecutive in (batch, mask head, pack) order
        kv_programs = group // cfg.pack if group % cfg.pack == 0 else 1
        grid = (programs * n_tiles,)
        _sparse_fwd_kernel[grid](
            q, k, v, out, lse_arg, lnum, lidx, cu,
            qk_scale,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse_arg.stride(0), lse_arg.stride(1),
            lnum.stride(0), lnum.stride(1),
            lidx.stride(0), lidx.stride(1), lidx.stride(2),
            t, n_tiles, hm, heads_per_mask, group, kv_programs,
            PACK=cfg.pack, ROWS=rows, U=u,
            MB=mask_block, BLOCK_N=cfg.block_n, HEAD_DIM=d,
            VARLEN=varlen, STORE_LSE=return_lse,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    if config is None:
        hopper_ws = hopper_refusal is None
        candidates = sparse_configs(mask_block, heads_per_mask, d, hopper_ws)
        # hopper_ws in the key: a layout the Hopper kernel refuses (its strides) never reuses a choice made with it
        key = ("sparse", mask_block, heads_per_mask, group, d, q.dtype, varlen, max(t, 1).bit_length(), hopper_ws)
        config = pick_config(
            key, candidates, launch, extra_key=lambda: memo_mask_key(mask_memo, mask_source, kv_num_blocks, kv_indices)
        )
    launch(config)
    return out, lse
