"""Causal FlashAttention forward that also emits SeerAttention's ground-truth block scores.

Algorithm
---------
A dense causal FlashAttention-2 forward (log2-domain online softmax, ``exp2``, unmasked steps off
the diagonal) with key steps of ``BLOCK_N`` keys, ``MB`` or ``MB / 2`` (the row maxima of the steps of
one mask block are max-combined). The ground truth is

    GT[I, J] = max_{i in I, j in J} P[i, j],  P[i, j] = exp(s_ij - lse_i),  rows of GT normalised,

and ``max_j P[i, j] = exp2(mblk[i, J] - m_i) / l_i`` where ``mblk[i, J]`` is the row maximum of the
(scaled, log2) logits of row ``i`` over key block ``J`` -- a quantity each step computes anyway for
its online softmax. So each step stores that ``BLOCK_M``-vector to a per-program scratch row; after
the key loop (final ``m_i``, ``l_i`` known) the epilogue rescales the stored maxima, takes the max
over the rows of each query block inside the tile (``BLOCK_M / MB`` of them), writes the row of GT,
and normalises it. Nothing of size T x T is materialised: the scratch is
``[programs, NB, BLOCK_M]`` fp32, reused tile after tile.

The grid is persistent (``2 x SMs`` programs, so the scratch stays small and mostly in L2) and walks
tiles heaviest first (last query tiles first), round robin, which also balances the causal work.

Layouts
-------
q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` (unit last stride; GQA by index, K/V never copied);
out ``[B, Hq, T, D]`` shaped, ``[B, T, Hq, D]`` in memory, like SDPA's flash backends (the distill
path's ``out.transpose(1, 2).contiguous()`` is then free); lse ``[B, Hq, T]`` fp32 (natural log);
block_scores ``[B, Hq, NB, NB]`` fp32, zero above the diagonal, rows summing to 1.

Supported: fp16, bf16 (fp32 with tf32 dots on the GPU, exact under the interpreter); head dims 16,
32, 64, 128; block sizes 16, 32, 64, 128; any T >= 1. ``STORE_SCORES=False`` gives the plain
dense causal forward with the same tiling (the baseline the score overhead is measured against).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LN2, LOG2E
from .config import KernelConfig, block_scores_configs, num_sms, pick_config

__all__ = ["attention_with_block_scores_fwd"]

_JC = 32  # key blocks per epilogue chunk


@triton.jit
def _dense_step(
    acc, l_i, m_i, q, K0, V0, j, pos_m, seq_len, qk_scale, stride_kt, stride_vt, offs_d,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key step of the online softmax; returns the step's row maxima too (log2 units)."""
    kpos = j * BLOCK_N + tl.arange(0, BLOCK_N)
    kpos64 = kpos.to(tl.int64)
    k_ptrs = K0 + kpos64[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V0 + kpos64[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        col_ok = kpos < seq_len
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        keep = col_ok[None, :] & (kpos[None, :] <= pos_m[:, None])
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        blk_max = tl.max(qk, 1)
        m_new = tl.maximum(m_i, blk_max)
        # Every valid row keeps its diagonal, but padded rows of a partial last tile may not.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m_new == float("-inf"), 1.0, tl.math.exp2(m_i - m_new))
        p = tl.math.exp2(qk - m_sub[:, None])
    else:
        blk_max = tl.max(qk, 1) * qk_scale
        m_new = tl.maximum(m_i, blk_max)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new, blk_max


@triton.jit
def _attn_block_scores_kernel(
    Q, K, V, Out, Lse, Scores, Scratch,
    qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    stride_sb, stride_sh, stride_sq,
    seq_len, nb, n_qt, n_tiles, scratch_stride, BH, HQ, GROUP,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MB: tl.constexpr, HEAD_DIM: tl.constexpr, JC: tl.constexpr,
    STORE_SCORES: tl.constexpr,
):  # fmt: skip
    R: tl.constexpr = BLOCK_M // MB  # query blocks per tile
    KPB: tl.constexpr = MB // BLOCK_N  # key steps per mask block
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_j = tl.arange(0, JC)
    offs_r = tl.arange(0, R)
    sub = offs_m // MB
    scratch = Scratch + pid.to(tl.int64) * scratch_stride

    for tile in range(pid, n_tiles, nprog):
        qt = n_qt - 1 - tile // BH  # heaviest tiles first
        bh = tile % BH
        b = bh // HQ
        h = bh % HQ
        kvh = h // GROUP
        q_start = qt * BLOCK_M
        pos_m = q_start + offs_m
        row_ok = pos_m < seq_len
        pos64 = pos_m.to(tl.int64)
        q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + pos64[:, None] * stride_qt
        q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        K0 = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        V0 = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Steps of BLOCK_N keys; a mask block is KPB steps whose row maxima are max-combined.
        n_full = q_start // BLOCK_N
        n_steps = tl.cdiv(tl.minimum(q_start + BLOCK_M, seq_len), BLOCK_N)
        blk_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for j in range(0, n_full):
            acc, l_i, m_i, blk_max = _dense_step(
                acc,
                l_i,
                m_i,
                q,
                K0,
                V0,
                j,
                pos_m,
                seq_len,
                qk_scale,
                stride_kt,
                stride_vt,
                offs_d,
                BLOCK_N,
                False,
            )
            if STORE_SCORES:
                if KPB > 1:
                    blk_max = tl.where(j % KPB == 0, blk_max, tl.maximum(blk_run, blk_max))
                    blk_run = blk_max
                tl.store(scratch + (j // KPB) * BLOCK_M + offs_m, blk_max)
        for j in range(n_full, n_steps):
            acc, l_i, m_i, blk_max = _dense_step(
                acc,
                l_i,
                m_i,
                q,
                K0,
                V0,
                j,
                pos_m,
                seq_len,
                qk_scale,
                stride_kt,
                stride_vt,
                offs_d,
                BLOCK_N,
                True,
            )
            if STORE_SCORES:
                if KPB > 1:
                    blk_max = tl.where(j % KPB == 0, blk_max, tl.maximum(blk_run, blk_max))
                    blk_run = blk_max
                tl.store(scratch + (j // KPB) * BLOCK_M + offs_m, blk_max)
        n_end = tl.cdiv(n_steps, KPB)  # mask blocks touched by this tile

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + pos64[:, None] * stride_ot
        tl.store(o_ptrs + offs_d[None, :], (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        tl.store(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + pos64, lse, mask=row_ok)

        if STORE_SCORES:
            # Scratch rows were written by other threads of this program: sync before reading.
            tl.debug_barrier()
            inv_l = tl.where(row_ok & ~empty, 1.0 / l_safe, 0.0)
            qb = qt * R + offs_r  # query blocks of this tile
            qb_ok = qb < nb
            s_base = Scores + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
            s_rows = s_base + qb.to(tl.int64)[None, :] * stride_sq  # [1, R]
            sums = tl.zeros([R], dtype=tl.float32)
            # NaN in, NaN out: a row that read a NaN has l_i = NaN (exp2 of a NaN logit), but the max
            # reductions below may drop NaN on the GPU (and tl.maximum in the key loop may too), so its
            # query block's whole score row is set to NaN explicitly, as in the reference (whose
            # normalisation reads the NaN). One flag per query block of the tile, no host sync.
            row_nan = row_ok & (l_i != l_i)
            qb_nan = tl.zeros([R], dtype=tl.int1)
            for r in tl.static_range(R):
                nan_r = tl.max(tl.where(row_nan & (sub == r), 1, 0), 0) > 0
                qb_nan = qb_nan | ((offs_r == r) & nan_r)
            for j0 in range(0, n_end, JC):
                jj = j0 + offs_j
                vals = tl.load(
                    scratch + jj[:, None] * BLOCK_M + offs_m[None, :],
                    mask=(jj < n_end)[:, None],
                    other=float("-inf"),
                    cache_modifier=".cg",
                )
                e = tl.math.exp2(vals - m_i[None, :]) * inv_l[None, :]  # [JC, BLOCK_M] = max_j P
                g = tl.zeros([JC, R], dtype=tl.float32)
                for r in tl.static_range(R):
                    g_r = tl.max(tl.where((sub == r)[None, :], e, 0.0), axis=1)  # [JC]
                    g = tl.where((offs_r == r)[None, :], g_r[:, None], g)
                sums += tl.sum(g, 0)
                tl.store(s_rows + jj[:, None], g, mask=(jj < nb)[:, None] & qb_ok[None, :])
            # Above the diagonal of the tile: zeros (the output is fully written).
            for j0 in range(tl.cdiv(n_end, JC) * JC, nb, JC):
                jj = j0 + offs_j
                zero = tl.where(qb_nan[None, :], float("nan"), tl.zeros([JC, R], dtype=tl.float32))
                tl.store(s_rows + jj[:, None], zero, mask=(jj < nb)[:, None] & qb_ok[None, :])
            tl.debug_barrier()
            inv_sum = tl.where(qb_nan, float("nan"), 1.0 / tl.where(sums > 0.0, sums, 1.0))
            for j0 in range(0, n_end, JC):
                jj = j0 + offs_j
                msk = (jj < nb)[:, None] & qb_ok[None, :]
                g = tl.load(s_rows + jj[:, None], mask=msk, other=0.0, cache_modifier=".cg")
                tl.store(s_rows + jj[:, None], g * inv_sum[None, :], mask=msk)
            # The next tile overwrites the scratch: every thread must be done reading it.
            tl.debug_barrier()


def attention_with_block_scores_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    scale: float,
    store_scores: bool = True,
    config: KernelConfig | None = None,
):
    """Launch the forward (inputs already validated).

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] -> out [B, Hq, T, D] shaped, [B, T, Hq, D] in memory,
    lse [B, Hq, T] fp32, block_scores [B, Hq, NB, NB] fp32 (None when ``store_scores`` is False).
    """
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    nb = triton.cdiv(t, block_size)
    out = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)  # see Layouts
    lse = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    scores = torch.empty((b, hq, nb, nb), dtype=torch.float32, device=q.device) if store_scores else None
    s_arg = scores if scores is not None else lse
    s_strides = (scores.stride(0), scores.stride(1), scores.stride(2)) if scores is not None else (0, 0, 0)
    qk_scale = scale * LOG2E
    # Persistent grid: enough programs for two per SM (one resident with 8 warps, two with 4).
    max_progs = 2 * num_sms(q.device)
    nbp = triton.cdiv(nb, _JC) * _JC

    def launch(cfg: KernelConfig):
        if cfg.block_m % block_size or block_size % cfg.block_n:
            raise ValueError(f"config {cfg.short()}: block_m must be a multiple of, and block_n divide, {block_size}")
        n_qt = triton.cdiv(t, cfg.block_m)
        n_tiles = n_qt * b * hq
        nprog = min(n_tiles, max_progs)
        scratch_stride = nbp * cfg.block_m
        scratch = torch.empty(nprog * scratch_stride if store_scores else 1, dtype=torch.float32, device=q.device)
        _attn_block_scores_kernel[(nprog,)](
            q, k, v, out, lse, s_arg, scratch,
            qk_scale,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            *s_strides,
            t, nb, n_qt, n_tiles, scratch_stride, b * hq, hq, group,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MB=block_size, HEAD_DIM=d, JC=_JC,
            STORE_SCORES=store_scores,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    if config is None:
        candidates = block_scores_configs(block_size, d)
        key = ("scores", block_size, group, d, q.dtype, store_scores, max(t, 1).bit_length())
        config = pick_config(key, candidates, launch)
    launch(config)
    return out, lse, scores
