"""Block-sparse causal FlashAttention backward over the kept blocks only (dQ, dK, dV).

Algorithm
---------
FlashAttention-2 backward from the forward's saved ``lse`` (softmax in the log2 domain, ``exp2``):
``P = exp(scale * Q K^T - lse)``, ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)``,
``dQ = scale * dS K``, ``dK = scale * dS^T Q`` with ``delta = rowsum(dO * O)``. Three launches:

1. preprocess, one program per (batch, query head, 64 rows): ``delta`` and ``lse * log2(e)`` with
   ``-inf`` (rows with no kept key) turned into ``+inf``, so that every ``P`` of such a row is
   ``exp2(x - inf) = 0``: zero gradients, never NaN;
2. dK/dV, one program per (batch, KV head, tile of ``KEYS`` keys inside one mask block ``J``):
   loads K/V once, then for each query head of the GQA group walks the *transposed* list of ``J``
   (the query blocks that keep ``J``: :attr:`seerattn.BlockMask.q_indices`; per query head masks
   give each head its own list, per KV-group masks one list for the group) in steps of ``ROWS``
   query rows, and accumulates dK and dV of the whole group in registers: GQA-native (no expanded
   K/V) and no atomics for dK/dV. The ascending list's leading entries ``I <= J`` (the diagonal, blocks above
   it) run with the causal mask, the rest without;
3. dQ, one program per (batch, query head(s), query tile inside one mask block), walking the
   forward list of its mask row exactly as the forward does (``PACK`` heads of one group share a
   program for per-group masks); entries left of the tile's diagonal run without masks.

The two passes recompute ``Q K^T`` and ``dO V^T``: 7 matmuls per tile pair instead of 5. The other
option, FlashAttention-2's, is **atomic dQ** (a dK/dV config with ``atomic_dq``, the ``ATOMIC_DQ``
constexpr): step 2 also computes ``scale * dS K`` for its query rows and adds it with fp32 atomic
adds into a zeroed ``[B, Hq, T, D]`` fp32 accumulator, converted to the input dtype after; step 3
does not run. Which one is faster depends on the GPU, the shape and the mask, so both are tuning
candidates of the dK/dV pass (:func:`.config.dkdv_configs`), each timed with its dQ work.

In the split path every output element is written by exactly one program and no atomics are used,
so it is **deterministic**: two runs on the same inputs give bitwise equal gradients. The atomic
path is not (the order of the fp32 additions varies from run to run). PyTorch's switch decides:
while ``torch.are_deterministic_algorithms_enabled()`` (``torch.use_deterministic_algorithms(True)``)
the split path runs, whatever was tuned.

The list entry of the next step is loaded one step ahead and carried through the loop (see
``sparse_fwd``: an index load that feeds the same step's K/V loads stalls the software pipeline).

Layouts
-------
q, out, dout ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` (any strides with a unit last stride);
lse ``[B, Hq, T]`` fp32 (natural log, -inf on empty rows); dq ``[B, Hq, T, D]``, dk/dv
``[B, Hkv, T, D]`` contiguous in the input dtype (atomic path: the dQ accumulator ``[B, Hq, T, D]``
fp32 contiguous, dq itself for fp32 inputs). Lists: forward ``kv_num_blocks [Bm, Hm, NQ]``,
``kv_indices [Bm, Hm, NQ, NK]``; transposed ``q_num_blocks [Bm, Hm, NK]``, ``q_indices
[Bm, Hm, NK, NQ]`` with Hm in (Hq, Hkv). Varlen: B == 1, ``cu_seqlens`` int32 ``[N + 1]``, Bm = N.
Offsets are int64 (128k tokens x 32 heads x B).

Supported: fp16, bf16, fp32 (tf32 dots on the GPU); head dims 16-128 (powers of two); mask block
sizes 16, 32, 64, 128. Limitations: queries and keys at the same positions (prefill); a dK/dV
program never spans two key blocks (so below 64-token blocks its tiles are short).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import LOG2E, count_below_from_end, count_below_from_start
from .config import KernelConfig, dkdv_configs, dq_configs, memo_mask_key, pick_config

__all__ = ["block_sparse_attention_bwd"]

_PRE_ROWS = 64


# ====================================================================== preprocess
@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, Lse, Delta, Lse2,
    stride_ob, stride_oh, stride_ot,
    stride_db, stride_dh, stride_dt,
    H, T,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) and lse2 = lse * log2(e) (+inf where lse = -inf); [B, H, T] fp32."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_t = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < T
    t64 = offs_t.to(tl.int64)
    o = tl.load(
        Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + t64[:, None] * stride_ot + offs_d[None, :],
        mask=ok[:, None], other=0.0,
    )  # fmt: skip
    do = tl.load(
        DOut + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + t64[:, None] * stride_dt + offs_d[None, :],
        mask=ok[:, None], other=0.0,
    )  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * T + t64  # lse, delta, lse2: contiguous [B, H, T]
    lse = tl.load(Lse + row, mask=ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(Delta + row, delta, mask=ok)
    tl.store(Lse2 + row, lse2, mask=ok)


# ====================================================================== dK / dV
@triton.jit
def _dkdv_step(
    dk, dv, k, v, entry, s, list_ptr, cnt, Q0, DO0, L0, D0, DQ0, kpos, seqlen, s0, qk_scale, sm_scale,
    stride_qt, stride_dot, offs_d,
    MB: tl.constexpr, ROWS: tl.constexpr, KPB: tl.constexpr, MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One step of ROWS query rows (of query block ``entry``) against the program's keys; with
    ``ATOMIC_DQ`` also adds these rows' share of dQ (``scale * dS K``) to the fp32 accumulator."""
    offs_r = tl.arange(0, ROWS)
    qpos = entry * MB + (s % KPB) * ROWS + offs_r
    next_entry = tl.load(list_ptr + (s + 1) // KPB, mask=(s + 1) // KPB < cnt, other=0)
    row_ok = qpos < seqlen  # a partial last block, or (varlen) a block past this sequence's end
    tok = (s0 + qpos).to(tl.int64)
    q = tl.load(Q0 + tok[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(L0 + tok, mask=row_ok, other=float("inf"))
    qk_t = tl.dot(k, tl.trans(q))  # [KEYS, ROWS]
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(kpos[:, None] <= qpos[None, :], p_t, 0.0)
    do = tl.load(DO0 + tok[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    delta = tl.load(D0 + tok, mask=row_ok, other=0.0)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    if ATOMIC_DQ:
        # Other key tiles add to the same rows; "relaxed": only the sum after the kernel is read.
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * sm_scale  # [ROWS, D]
        dq_ptrs = DQ0 + tok[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv, next_entry


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, DQAcc, Lse2, Delta, QNum, QIdx, CuSeq,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_ij,
    seq_len, HKV, HQ, HEADS_PER_MASK, GROUP,
    MB: tl.constexpr, KEYS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, TAIL: tl.constexpr = 4,
):  # fmt: skip
    KPB: tl.constexpr = MB // ROWS  # steps per query block
    bk = tl.program_id(0)
    b = bk // HKV
    kvh = bk % HKV
    k_start = tl.program_id(1) * KEYS  # low key tiles first: they have the longest lists (causal)
    if VARLEN:
        s0 = tl.load(CuSeq + b)
        seqlen = tl.load(CuSeq + b + 1) - s0
        tb = b * 0
    else:
        s0 = b * 0
        seqlen = seq_len
        tb = b
    if k_start >= seqlen:
        return
    jb = k_start // MB

    offs_d = tl.arange(0, HEAD_DIM)
    kpos = k_start + tl.arange(0, KEYS)
    key_ok = kpos < seqlen
    ktok = (s0 + kpos).to(tl.int64)
    tb64 = tb.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    k_ptrs = K + tb64 * stride_kb + kvh64 * stride_kh + ktok[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + tb64 * stride_vb + kvh64 * stride_vh + ktok[:, None] * stride_vt + offs_d[None, :]
    k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([KEYS, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([KEYS, HEAD_DIM], dtype=tl.float32)

    for g in range(0, GROUP):
        h = kvh * GROUP + g
        hm = h // HEADS_PER_MASK
        list_ptr = QIdx + b.to(tl.int64) * stride_ib + hm.to(tl.int64) * stride_ih + jb.to(tl.int64) * stride_ij
        cnt = tl.load(QNum + b.to(tl.int64) * stride_nb + hm.to(tl.int64) * stride_nh + jb)
        # Query blocks I <= J (the diagonal, blocks above it) lead the ascending list: masked.
        n_masked = count_below_from_start(list_ptr, cnt, jb + 1, TAIL)
        row0 = (tb64 * HQ + h) * seq_len  # lse2 / delta are contiguous [B, Hq, T]
        Q0 = Q + tb64 * stride_qb + h.to(tl.int64) * stride_qh
        DO0 = DO + tb64 * stride_dob + h.to(tl.int64) * stride_doh
        L0 = Lse2 + row0
        D0 = Delta + row0
        DQ0 = DQAcc + row0 * HEAD_DIM  # the fp32 accumulator: contiguous [B, Hq, T, D]
        entry = tl.load(list_ptr)  # slot 0 always exists in memory
        masked_steps = n_masked * KPB
        for s in range(0, masked_steps):
            dk, dv, entry = _dkdv_step(
                dk, dv, k, v, entry, s, list_ptr, cnt, Q0, DO0, L0, D0, DQ0, kpos, seqlen, s0, qk_scale, sm_scale,
                stride_qt, stride_dot, offs_d, MB, ROWS, KPB, True, ATOMIC_DQ, HEAD_DIM,
            )  # fmt: skip
        for s in range(masked_steps, cnt * KPB):
            dk, dv, entry = _dkdv_step(
                dk, dv, k, v, entry, s, list_ptr, cnt, Q0, DO0, L0, D0, DQ0, kpos, seqlen, s0, qk_scale, sm_scale,
                stride_qt, stride_dot, offs_d, MB, ROWS, KPB, False, ATOMIC_DQ, HEAD_DIM,
            )  # fmt: skip

    # dK and dV share one layout (allocated together by the launcher).
    out_off = tb64 * stride_dkb + kvh64 * stride_dkh + ktok[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# ====================================================================== dQ
@triton.jit
def _dq_step(
    dq, entry, q, do, lse2, delta, K0, V0, list_ptr, s, cnt, pos_m, seqlen, qk_scale,
    stride_kt, stride_vt, offs_d,
    MB: tl.constexpr, BLOCK_N: tl.constexpr, KPB: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N-key step of key block ``entry`` for the program's query rows."""
    kpos = entry * MB + (s % KPB) * BLOCK_N + tl.arange(0, BLOCK_N)
    next_entry = tl.load(list_ptr + (s + 1) // KPB, mask=(s + 1) // KPB < cnt, other=0)
    kpos64 = kpos.to(tl.int64)
    k_ptrs = K0 + kpos64[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V0 + kpos64[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        col_ok = kpos < seqlen
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, tl.trans(k))
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(col_ok[None, :] & (kpos[None, :] <= pos_m[:, None]), p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq, next_entry


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, Lse2, Delta, LNum, LIdx, CuSeq,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_iq,
    seq_len, n_tiles, HQ, HM, HEADS_PER_MASK, GROUP,
    PACK: tl.constexpr, ROWS: tl.constexpr, MB: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, TAIL: tl.constexpr = 4,
):  # fmt: skip
    BLOCK_M: tl.constexpr = PACK * ROWS
    KPB: tl.constexpr = MB // BLOCK_N
    PACKS = HEADS_PER_MASK // PACK
    pid0 = tl.program_id(0)
    tile = n_tiles - 1 - tl.program_id(1)  # heaviest (last) query tiles first
    pk = pid0 % PACKS
    bh = pid0 // PACKS
    b = bh // HM
    hm = bh % HM
    if VARLEN:
        s0 = tl.load(CuSeq + b)
        seqlen = tl.load(CuSeq + b + 1) - s0
        tb = b * 0
    else:
        s0 = b * 0
        seqlen = seq_len
        tb = b
    q_start = tile * ROWS
    if q_start >= seqlen:
        return
    list_row = q_start // MB
    h0 = hm * HEADS_PER_MASK + pk * PACK
    kvh = h0 // GROUP

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    head_m = (h0 + offs_m // ROWS).to(tl.int64)
    pos_m = q_start + offs_m % ROWS
    row_ok = pos_m < seqlen
    tok_m = (s0 + pos_m).to(tl.int64)
    tb64 = tb.to(tl.int64)
    q = tl.load(
        Q + tb64 * stride_qb + head_m[:, None] * stride_qh + tok_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + tb64 * stride_dob + head_m[:, None] * stride_doh + tok_m[:, None] * stride_dot + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )  # fmt: skip
    row = (tb64 * HQ + head_m) * seq_len + tok_m  # lse2 / delta are contiguous [B, Hq, T]
    lse2 = tl.load(Lse2 + row, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)
    K0 = K + tb64 * stride_kb + kvh.to(tl.int64) * stride_kh + s0.to(tl.int64) * stride_kt
    V0 = V + tb64 * stride_vb + kvh.to(tl.int64) * stride_vh + s0.to(tl.int64) * stride_vt

    list_ptr = LIdx + b.to(tl.int64) * stride_ib + hm.to(tl.int64) * stride_ih + list_row.to(tl.int64) * stride_iq
    cnt = tl.load(LNum + b.to(tl.int64) * stride_nb + hm.to(tl.int64) * stride_nh + list_row)
    n_full = count_below_from_end(list_ptr, cnt, list_row, 0, TAIL)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    entry = tl.load(list_ptr)  # slot 0 always exists in memory
    for s in range(0, n_full * KPB):
        dq, entry = _dq_step(
            dq, entry, q, do, lse2, delta, K0, V0, list_ptr, s, cnt, pos_m, seqlen, qk_scale,
            stride_kt, stride_vt, offs_d, MB, BLOCK_N, KPB, False,
        )  # fmt: skip
    for s in range(n_full * KPB, cnt * KPB):
        dq, entry = _dq_step(
            dq, entry, q, do, lse2, delta, K0, V0, list_ptr, s, cnt, pos_m, seqlen, qk_scale,
            stride_kt, stride_vt, offs_d, MB, BLOCK_N, KPB, True,
        )  # fmt: skip
    dq_ptrs = DQ + tb64 * stride_dqb + head_m[:, None] * stride_dqh + tok_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ====================================================================== launcher
def _check_dkdv_config(cfg: KernelConfig, mask_block: int) -> None:
    keys, rows = cfg.block_m, cfg.block_n
    for name, x in (("keys (block_m)", keys), ("rows (block_n)", rows)):
        if x < 16 or x & (x - 1) or mask_block % x:
            raise ValueError(f"dK/dV config {cfg.short()}: {name} must be a power of two >= 16 dividing {mask_block}")
    if cfg.pack != 1:
        raise ValueError(f"dK/dV config {cfg.short()}: pack must be 1 (the program loops over the group)")


def _dq_rows(cfg: KernelConfig, mask_block: int, heads_per_mask: int) -> int:
    if cfg.atomic_dq:
        raise ValueError(f"dQ config {cfg.short()}: atomic_dq belongs to the dK/dV config, not the dQ pass")
    rows = cfg.block_m // cfg.pack
    if cfg.block_m % cfg.pack or heads_per_mask % cfg.pack:
        raise ValueError(f"dQ config {cfg.short()}: pack must divide the heads per mask ({heads_per_mask})")
    for name, x in (("rows", rows), ("block_n", cfg.block_n)):
        if x < 16 or x & (x - 1) or mask_block % x:
            raise ValueError(f"dQ config {cfg.short()}: {name} must be a power of two >= 16 dividing {mask_block}")
    return rows


def block_sparse_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor,
    mask_block: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    dkdv_config: KernelConfig | None = None,
    dq_config: KernelConfig | None = None,
    mask_source: tuple | None = None,
    mask_memo: dict | None = None,
):
    """Gradients of the block-sparse forward (inputs already validated by the caller).

    q, out, dout: [B, Hq, T, D]; k, v: [B, Hkv, T, D]; lse: [B, Hq, T] fp32 from the forward;
    forward lists ``kv_num_blocks [Bm, Hm, NQ]`` / ``kv_indices [Bm, Hm, NQ, NK]`` and transposed
    lists ``q_num_blocks [Bm, Hm, NK]`` / ``q_indices [Bm, Hm, NK, NQ]``. The configs force a tile
    configuration (tests, benchmarks); ``mask_source`` (:attr:`seerattn.BlockMask.source`) keys the
    tuned choice with the mask's kind, as in the forward (:func:`.config.mask_key`; ``mask_memo``: kept
    with the mask, :attr:`seerattn.BlockMask.memo`).

    Split or atomic dQ: the dK/dV config decides (:attr:`.config.KernelConfig.atomic_dq`; a forced
    ``dq_config`` is not used when it is atomic). The tuner times each dK/dV candidate together with
    the dQ work it implies and keeps the fastest per shape and mask kind. While
    ``torch.are_deterministic_algorithms_enabled()`` (``torch.use_deterministic_algorithms(True)``)
    only split candidates are considered, and a forced atomic config is refused: the split path is
    bitwise reproducible, the atomic one is not (the order of the fp32 additions varies).
    Returns dq [B, Hq, T, D], dk, dv [B, Hkv, T, D].
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    bm, hm, nq, _ = kv_indices.shape
    group = hq // hkv
    heads_per_mask = hq // hm
    varlen = cu_seqlens is not None
    kv_num_blocks, kv_indices = kv_num_blocks.contiguous(), kv_indices.contiguous()
    q_num_blocks, q_indices = q_num_blocks.contiguous(), q_indices.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    lse = lse.contiguous()
    qk_scale = scale * LOG2E
    cu = cu_seqlens if varlen else kv_num_blocks  # dummy pointer when not varlen
    max_len = t if not varlen else mask_block * nq

    delta = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    _bwd_preprocess_kernel[(b * hq, triton.cdiv(t, _PRE_ROWS))](
        out, dout, lse, delta, lse2,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        hq, t, ROWS=_PRE_ROWS, HEAD_DIM=d, num_warps=4,
    )  # fmt: skip

    dq = torch.empty((b, hq, t, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, t, d), dtype=k.dtype, device=q.device)
    dv = torch.empty_like(dk)

    @functools.cache
    def dq_accumulator() -> torch.Tensor:
        """fp32 [B, Hq, T, D] for the atomic path (dq itself when the inputs are fp32)."""
        return dq if dq.dtype == torch.float32 else torch.empty((b, hq, t, d), dtype=torch.float32, device=q.device)

    def launch_dkdv(cfg: KernelConfig):
        _check_dkdv_config(cfg, mask_block)
        dq_acc = dq_accumulator() if cfg.atomic_dq else delta  # dummy pointer when split
        grid = (bm * hkv, triton.cdiv(min(max_len, nq * mask_block), cfg.block_m))
        _dkdv_kernel[grid](
            q, k, v, dout, dk, dv, dq_acc, lse2, delta, q_num_blocks, q_indices, cu,
            qk_scale, scale,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            q_num_blocks.stride(0), q_num_blocks.stride(1),
            q_indices.stride(0), q_indices.stride(1), q_indices.stride(2),
            t, hkv, hq, heads_per_mask, group,
            MB=mask_block, KEYS=cfg.block_m, ROWS=cfg.block_n, HEAD_DIM=d, VARLEN=varlen, ATOMIC_DQ=cfg.atomic_dq,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    def launch_dq(cfg: KernelConfig):
        rows = _dq_rows(cfg, mask_block, heads_per_mask)
        n_tiles = triton.cdiv(min(max_len, nq * mask_block), rows)
        grid = (bm * hm * (heads_per_mask // cfg.pack), n_tiles)
        _dq_kernel[grid](
            q, k, v, dout, dq, lse2, delta, kv_num_blocks, kv_indices, cu,
            qk_scale, scale,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            kv_num_blocks.stride(0), kv_num_blocks.stride(1),
            kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2),
            t, n_tiles, hq, hm, heads_per_mask, group,
            PACK=cfg.pack, ROWS=rows, MB=mask_block, BLOCK_N=cfg.block_n, HEAD_DIM=d, VARLEN=varlen,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    key = (mask_block, heads_per_mask, group, d, q.dtype, varlen, max(t, 1).bit_length())
    kind = functools.cache(lambda: memo_mask_key(mask_memo, mask_source, kv_num_blocks, kv_indices))

    @functools.cache
    def tuned_dq() -> KernelConfig:
        return pick_config(("dq", *key), dq_configs(mask_block, heads_per_mask, d), launch_dq, extra_key=kind)

    def launch_passes(cfg: KernelConfig, dq_cfg: KernelConfig | None = None):
        """The dK/dV pass of ``cfg`` and the dQ work it implies (what the tuner times)."""
        if cfg.atomic_dq:
            acc = dq_accumulator()
            acc.zero_()
            launch_dkdv(cfg)
            if acc is not dq:
                dq.copy_(acc)
        else:
            launch_dkdv(cfg)
            launch_dq(dq_cfg if dq_cfg is not None else tuned_dq())

    deterministic = torch.are_deterministic_algorithms_enabled()
    if dkdv_config is None:
        candidates = dkdv_configs(mask_block, d)
        if deterministic:
            candidates = [c for c in candidates if not c.atomic_dq]
            if not candidates:
                raise RuntimeError(
                    "block_sparse_attention backward: torch.are_deterministic_algorithms_enabled() is True but "
                    "every dK/dV candidate uses atomic dQ; the split (deterministic) configs are atomic_dq=False"
                )
        # Split and atomic candidates are timed with their dQ work (launch_passes), per determinism mode.
        dkdv_config = pick_config(("dkdv", *key, deterministic), candidates, launch_passes, extra_key=kind)
    elif dkdv_config.atomic_dq and deterministic:
        raise RuntimeError(
            f"block_sparse_attention backward: dK/dV config {dkdv_config.short()} accumulates dQ with atomic adds, "
            "which is not deterministic, and torch.are_deterministic_algorithms_enabled() is True; force a split "
            "config (atomic_dq=False) or call torch.use_deterministic_algorithms(False)"
        )
    launch_passes(dkdv_config, dq_config)
    return dq, dk, dv
