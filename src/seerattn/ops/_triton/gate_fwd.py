"""The prefill AttnGate's block logits in two Triton kernels (inference: no backward).

Algorithm
---------
Exactly :class:`seerattn.gate.AttnGate`'s forward, in fp32 whatever the input dtype:

1. ``_pool_project_kernel`` (once for Q, once for K): a program owns ``BLOCK_W`` pooling windows of
   one input head. It walks their tokens once (reading q/k in place, any strides with a unit last
   stride, no upcast copy), keeps the running sum / max / min in fp32, divides the sum by the
   window's real token count (a partial last window uses the tokens it has), projects each pooled
   channel group with the head's weight slice (``tl.dot`` in IEEE fp32) and applies RoPE at the
   window's first position. The rotate-half is done without permuting registers: the two halves
   of the gate width are projected separately (``x1 = p @ W[:, :Dg/2]``, ``x2 = p @ W[:, Dg/2:]``),
   so ``out1 = x1 cos1 - x2 sin1`` and ``out2 = x2 cos2 + x1 sin2``. K is pooled once per KV head and
   projected for each query head of its group (the eager gate's ``repeat_interleave``), so K is
   read once. A gate without a Q projection uses an identity weight (head stride 0).
   Output: gate vectors ``[B, Hq, N, Dg]`` fp32 (N = windows for Q, blocks for K): O(T * Dg) per
   head group, the only intermediate the gate keeps.
2. ``_gate_scores_kernel``: a program owns ``BLOCK_I`` query blocks of one head and walks the key
   tiles left to right. For each of the block's ``R = block_size // q_step`` query windows it
   computes the window-vs-key-block logits ``qg . kg / sqrt(Dg)`` and folds them into a running
   log-sum-exp over windows (padding windows of a partial last block are left out, which equals the
   eager gate's finite-floor padding after the log-sum-exp). Key tiles above the diagonal are
   written as ``-inf`` without any arithmetic; inside a tile, entries above the diagonal are ``-inf``.

Layouts: q ``[B, Hq, T, D]``, k ``[B, Hkv, T, D]`` (views allowed); weights ``[Hq, C * D, Dg]``; cos/sin
``[B or 1, NS, Dg]`` (one entry per query window; key blocks use every ``R``-th); logits
``[B, Hq, NB, NB]`` fp32 contiguous.

Supported: head dims 16..128 (powers of two), any even ``Dg >= 2`` (padded to a power of two >= 32
inside), pooling ``avg``/``max``/``min`` in any order, ``q_step`` any power of two up to the block size.
Limitations: forward only (training keeps the eager gate, which has a backward).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .config import interpreting

__all__ = ["gate_logits_fwd"]

_POOL_CODES = {"avg": 0, "max": 1, "min": 2}


@triton.jit
def _pick(code: tl.constexpr, avg, mx, mn):
    if code == 0:
        return avg
    elif code == 1:
        return mx
    else:
        return mn


@triton.jit
def _project_half(o, pooled, W, c: tl.constexpr, col0, offs_d, offs_j, HALF, stride_wc, D: tl.constexpr):
    """o += pooled [BLOCK_W, D] @ W[c * D:(c + 1) * D, col0:col0 + HALF] (columns past HALF are 0)."""
    w = tl.load(
        W + (c * D + offs_d)[:, None] * stride_wc + (col0 + offs_j)[None, :], mask=(offs_j < HALF)[None, :], other=0.0
    ).to(tl.float32)
    return tl.dot(pooled, w, o, input_precision="ieee")


@triton.jit
def _pool_project_kernel(
    X, W, Cos, Sin, Out,
    stride_xb, stride_xh, stride_xt,
    stride_wh, stride_wc,
    stride_cb, stride_cn,
    stride_ob, stride_oh, stride_on,
    T, NP, H_IN, GROUP, HALF, COS_STEP,
    STEP: tl.constexpr, D: tl.constexpr, HALF_P: tl.constexpr, BLOCK_W: tl.constexpr,
    NPOOL: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    NEED_MAX: tl.constexpr, NEED_MIN: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // H_IN
    h = bh % H_IN
    rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # pooling windows
    row_ok = rows < NP
    start = rows * STEP
    offs_d = tl.arange(0, D)
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh

    acc = tl.zeros([BLOCK_W, D], dtype=tl.float32)
    mx = tl.full([BLOCK_W, D], float("-inf"), dtype=tl.float32)
    mn = tl.full([BLOCK_W, D], float("inf"), dtype=tl.float32)
    for s in range(STEP):
        tok = start + s
        ok = (row_ok & (tok < T))[:, None]
        x = tl.load(x_base + tok.to(tl.int64)[:, None] * stride_xt + offs_d[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        acc += x
        if NEED_MAX:
            mx = tl.where(ok, tl.maximum(mx, x), mx)
        if NEED_MIN:
            mn = tl.where(ok, tl.minimum(mn, x), mn)
    count = tl.minimum(T - start, STEP)
    avg = acc / tl.where(row_ok, count, 1).to(tl.float32)[:, None]
    # rows past the end hold +-inf in max/min: zero them so the dot stays finite (never stored)
    mx = tl.where(row_ok[:, None], mx, 0.0)
    mn = tl.where(row_ok[:, None], mn, 0.0)

    offs_j = tl.arange(0, HALF_P)
    j_ok = offs_j < HALF
    if ROPE:
        c_base = b.to(tl.int64) * stride_cb + (rows * COS_STEP).to(tl.int64)[:, None] * stride_cn
        cmask = row_ok[:, None] & j_ok[None, :]
        cos1 = tl.load(Cos + c_base + offs_j[None, :], mask=cmask, other=0.0).to(tl.float32)
        cos2 = tl.load(Cos + c_base + (HALF + offs_j)[None, :], mask=cmask, other=0.0).to(tl.float32)
        sin1 = tl.load(Sin + c_base + offs_j[None, :], mask=cmask, other=0.0).to(tl.float32)
        sin2 = tl.load(Sin + c_base + (HALF + offs_j)[None, :], mask=cmask, other=0.0).to(tl.float32)
    for g in range(GROUP):
        hout = h * GROUP + g
        w_base = W + hout.to(tl.int64) * stride_wh
        o1 = tl.zeros([BLOCK_W, HALF_P], dtype=tl.float32)
        o2 = tl.zeros([BLOCK_W, HALF_P], dtype=tl.float32)
        p = _pick(P0, avg, mx, mn)
        o1 = _project_half(o1, p, w_base, 0, 0, offs_d, offs_j, HALF, stride_wc, D)
        o2 = _project_half(o2, p, w_base, 0, HALF, offs_d, offs_j, HALF, stride_wc, D)
        if NPOOL > 1:
            p = _pick(P1, avg, mx, mn)
            o1 = _project_half(o1, p, w_base, 1, 0, offs_d, offs_j, HALF, stride_wc, D)
            o2 = _project_half(o2, p, w_base, 1, HALF, offs_d, offs_j, HALF, stride_wc, D)
        if NPOOL > 2:
            p = _pick(P2, avg, mx, mn)
            o1 = _project_half(o1, p, w_base, 2, 0, offs_d, offs_j, HALF, stride_wc, D)
            o2 = _project_half(o2, p, w_base, 2, HALF, offs_d, offs_j, HALF, stride_wc, D)
        if ROPE:
            r1 = o1 * cos1 - o2 * sin1
            r2 = o2 * cos2 + o1 * sin2
        else:
            r1 = o1
            r2 = o2
        o_ptr = (
            Out + b.to(tl.int64) * stride_ob + hout.to(tl.int64) * stride_oh
            + rows.to(tl.int64)[:, None] * stride_on + offs_j[None, :]
        )  # fmt: skip
        smask = row_ok[:, None] & j_ok[None, :]
        tl.store(o_ptr, r1, mask=smask)
        tl.store(o_ptr + HALF, r2, mask=smask)


@triton.jit
def _gate_scores_kernel(
    QG, KG, Out,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_oi,
    NS, NB, HQ, DG, n_row_tiles, sqrt_dg,
    R: tl.constexpr, DG_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    it = n_row_tiles - 1 - tl.program_id(1)  # long (late) rows first
    rows = it * BLOCK_I + tl.arange(0, BLOCK_I)  # query blocks
    row_ok = rows < NB
    offs_g = tl.arange(0, DG_P)
    g_ok = offs_g < DG
    q_base = QG + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = KG + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows.to(tl.int64)[:, None] * stride_oi
    last_row = it * BLOCK_I + BLOCK_I - 1
    for j0 in range(0, NB, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < NB
        smask = row_ok[:, None] & col_ok[None, :]
        if j0 <= last_row:
            kg = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_g[None, :],
                         mask=col_ok[:, None] & g_ok[None, :], other=0.0)  # fmt: skip
            if R == 1:
                qg = tl.load(q_base + rows.to(tl.int64)[:, None] * stride_qn + offs_g[None, :],
                             mask=row_ok[:, None] & g_ok[None, :], other=0.0)  # fmt: skip
                lse = tl.dot(qg, tl.trans(kg), input_precision="ieee") / sqrt_dg
            else:
                m = tl.full([BLOCK_I, BLOCK_J], float("-inf"), dtype=tl.float32)
                acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
                for w in range(R):
                    win = rows * R + w
                    w_ok = row_ok & (win < NS)  # a partial last block has fewer windows
                    qg = tl.load(q_base + win.to(tl.int64)[:, None] * stride_qn + offs_g[None, :],
                                 mask=w_ok[:, None] & g_ok[None, :], other=0.0)  # fmt: skip
                    x = tl.dot(qg, tl.trans(kg), input_precision="ieee") / sqrt_dg
                    x = tl.where(w_ok[:, None], x, float("-inf"))
                    m_new = tl.maximum(m, x)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    acc = acc * tl.exp(m - m_safe) + tl.exp(x - m_safe)
                    m = m_new
                lse = m + tl.log(tl.where(acc > 0.0, acc, 1.0))  # acc is 0 only on rows past NB
            lse = tl.where(cols[None, :] <= rows[:, None], lse, float("-inf"))
            tl.store(o_base + cols[None, :], lse, mask=smask)
        else:
            tl.store(o_base + cols[None, :], tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32), mask=smask)


@functools.lru_cache(maxsize=8)
def _identity(d: int, device: torch.device) -> torch.Tensor:
    """[1, D, D] identity weight: a gate without a Q projection uses the pooled Q as is."""
    return torch.eye(d, device=device).unsqueeze(0)


def _pool_project(x, w, cos, sin, step, poolings, group, cos_step, rope):
    """Pooled, projected, rotated gate vectors [B, H_in * group, ceil(T / step), Dg] fp32."""
    b, h_in, t, d = x.shape
    dg = w.shape[-1]
    npool = len(poolings)
    codes = [_POOL_CODES[p] for p in poolings] + [0] * (3 - npool)
    n = -(-t // step)
    out = torch.empty(b, h_in * group, n, dg, dtype=torch.float32, device=x.device)
    half = dg // 2
    block_w = 16 if interpreting() else 32
    cos_arg = cos if rope else out
    sin_arg = sin if rope else out
    stride_cb = (cos.stride(0) if cos.shape[0] > 1 else 0) if rope else 0
    stride_cn = cos.stride(1) if rope else 0
    grid = (b * h_in, triton.cdiv(n, block_w))
    _pool_project_kernel[grid](
        x, w, cos_arg, sin_arg, out,
        x.stride(0), x.stride(1), x.stride(2),
        w.stride(0), w.stride(1),
        stride_cb, stride_cn,
        out.stride(0), out.stride(1), out.stride(2),
        t, n, h_in, group, half, cos_step,
        STEP=step, D=d, HALF_P=max(16, triton.next_power_of_2(half)), BLOCK_W=block_w,
        NPOOL=npool, P0=codes[0], P1=codes[1], P2=codes[2],
        NEED_MAX="max" in poolings, NEED_MIN="min" in poolings, ROPE=rope,
        num_warps=4 if interpreting() or d <= 64 else 8,  # D = 128: three [32, 128] fp32 accumulators
    )  # fmt: skip
    return out


def gate_logits_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    k_proj: torch.Tensor,
    q_proj: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    block_size: int,
    q_step: int,
    q_pooling: tuple[str, ...],
    k_pooling: tuple[str, ...],
) -> torch.Tensor:
    """Launch the two gate kernels (inputs already validated by the caller).

    q: [B, Hq, T, D], k: [B, Hkv, T, D] (unit last stride); k_proj [Hq, Ck * D, Dg]; q_proj
    [Hq, Cq * D, Dg] or None (pooled Q used as is: one pooling, Dg == D); cos/sin [B or 1, NS, Dg]
    with unit last stride, or None (no RoPE). Returns logits [B, Hq, NB, NB] fp32, ``-inf`` above
    the block diagonal.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    rope = cos is not None
    r = block_size // q_step
    wq = _identity(d, q.device) if q_proj is None else q_proj
    if q_proj is None:
        wq = wq.expand(hq, d, d)  # head stride 0: one identity for every head
    qg = _pool_project(q, wq, cos, sin, q_step, q_pooling, 1, 1, rope)  # [B, Hq, NS, Dg]
    kg = _pool_project(k, k_proj, cos, sin, block_size, k_pooling, hq // hkv, r, rope)  # [B, Hq, NB, Dg]
    ns, nb, dg = qg.shape[2], kg.shape[2], kg.shape[3]
    out = torch.empty(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    block_i, block_j = (16, 16) if interpreting() else (32, 64)
    n_row_tiles = triton.cdiv(nb, block_i)
    _gate_scores_kernel[(b * hq, n_row_tiles)](
        qg, kg, out,
        qg.stride(0), qg.stride(1), qg.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        ns, nb, hq, dg, n_row_tiles, math.sqrt(dg),
        R=r, DG_P=max(16, triton.next_power_of_2(dg)), BLOCK_I=block_i, BLOCK_J=block_j,
        num_warps=4 if interpreting() or dg <= 64 else 8,
    )  # fmt: skip
    return out
