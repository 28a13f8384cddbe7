"""The prefill AttnGate's block logits: a pooling kernel, the projection, one scores kernel
(inference: no backward).

Algorithm
---------
Exactly :class:`seerattn.gate.AttnGate`'s forward, in fp32 whatever the input dtype:

1. ``_pool_kernel`` (one launch: K's blocks and Q's windows, two jobs): a program owns ``BLOCK_W`` pooling
   windows of one head. It walks their tokens once (an unrolled loop: every token's row load in flight at
   once; q/k read in place, any strides with a unit last stride, no upcast copy of the sequence), keeps the
   running sum / max / min in fp32 and writes the pooled channels ``[B, H, N, C * D]`` (N = ceil(T /
   window)); the sum is divided by the window's real token count (a partial last window uses the tokens it
   has). That is ``C * D / window`` floats per token and head (Q: 384 / 16 with the windowed gate), smaller
   than the sequence itself. At the default ``precision`` ("tf32x3") a projected input's rows are written
   *split* instead: each row times the power of two that puts its largest value in [2^14, 2^15), as fp16 ``hi``
   (the value rounded) and fp16 ``lo`` (the exact remainder rounded): 22 significant bits, fp16's range whatever
   the row's, and the inverse scale a row (``[B, H, N]`` fp32). A 16-bit input's max and min channels are its own
   values, exact in ``hi``: their ``lo`` halves are not written (nor read by the projection), so the testbed's
   split rows take 8 bytes a channel triple where fp32 rows take 12 (:func:`_lo_pools`, session 24).
2. ``_project_kernel`` (one launch: K's and Q's jobs): a program owns ``BLOCK_M`` pooled rows of one query head and
   multiplies them by the head's weights ``[C * D, Dg]`` in steps of ``BLOCK_K`` channels on tensor cores, the two
   halves of the gate dimension apart in the end (at "tf32x3" one ``[BLOCK_M, Dg]`` product a step, split after the
   loop; else two ``[BLOCK_M, Dg / 2]`` accumulators). At "tf32x3" the operands are split (the
   weights by ``_split_weights_kernel``, once per weights: kept on them until they change, ``_split_weights_cached``;
   a power of two a rotate-half pair of columns) and each step
   sums three fp16 products (``hi.lo + lo.hi + hi.hi``, exact in the tensor cores' fp32), added to the running sums in
   fp32 and scaled back at the end: products to ~2^-22 as with three TF32 products, at fp16's tensor-core rate, without
   splitting anything in the loop (the projection 0.103 vs 0.177 ms at 32k, 0.33 vs 0.68 at 128k; the whole gate's error
   against fp64 4.90e-7 vs 5.03e-7 and the eager fp32 gate's 4.82e-7: session 23); at "ieee" / "tf32" one ``tl.dot`` of
   that precision on fp32 rows. With RoPE it rotates them in registers (rotate-half: channel ``j`` with ``j + Dg / 2``,
   the eager gate's :func:`seerattn.gate.apply_rotary`) at row ``n``'s cos/sin row ``n * C_STEP`` (1 for query windows,
   ``R`` for key blocks: their first window) and writes the gate vectors ``[B, Hq, N, Dg]`` fp32 once. K is pooled once
   per KV head; each query head of its group reads it. It replaced an fp32 cuBLAS matmul (SIMT: 0.18 ms a layer at 32k
   for Q on the H200, session 9 profile) and a RoPE pass that read and wrote the gate vectors again: the whole gate
   0.540 vs 0.580 ms at 32k, 3.097 vs 3.152 ms at 128k (H200, session 10,
   docs/experiments/prefill-gate-policy/session10). One launch for both inputs, K's jobs first (fewer, longer programs,
   which Q's fill around): the whole gate 0.466 vs 0.478 ms at 32k, 2.92 vs 2.91 ms at 128k (H200, session 16, three
   alternating rounds each).
3. ``_rope_kernel``: only for a gate without a Q projection (the pooled Q is the gate query), in place.
4. ``_gate_scores_kernel``: a program owns ``BLOCK_I`` query blocks of one head, that is their ``BLOCK_I * R`` query
   windows (``R = block_size // q_step``; window ``block * R + w``, consecutive), and walks the key tiles left to right.
   The windows are loaded once, before the key loop; each key tile is one ``[BLOCK_J, Dg] x [Dg, BLOCK_I * R]`` dot,
   ``kg . qg / sqrt(Dg)`` for every window at once: transposed, so that the loop-invariant windows are the operand kept
   in shared memory and the key tile the one in registers (fp32 dots on tensor cores as three fp16 products of split
   operands by default, the keys split by the projection, or IEEE fp32: ``precision``), then the log-sum-exp over each
   block's ``R`` windows (the scores seen as ``[BLOCK_J, BLOCK_I, R]``, reduced over axis 2; padding windows of a
   partial last block are left out, which equals the eager gate's finite-floor padding after the log-sum-exp). Two key
   tiles a loop iteration at tf32x3 (``SCORES_STEPS``): the second tile's products are issued before the first's
   log-sum-exp, which runs while the tensor cores work (the same logits bit for bit as one tile an iteration). Key tiles
   above the diagonal are written as ``-inf`` without any arithmetic (a second loop; skipped with ``causal_only``, for
   the sparse path's selection, which reads only the causal part: 268 MB of a layer's writes at 128k); inside a tile,
   entries above the diagonal are ``-inf``.

Layouts: q ``[B, Hq, T, D]``, k ``[B, Hkv, T, D]`` (views allowed); weights ``[Hq, C * D, Dg]``; cos/sin
``[B or 1, NS, Dg]`` (one entry per query window; key blocks use every ``R``-th), any float dtype; logits
``[B, Hq, NB, NB]`` fp32 contiguous.

Supported: head dims 16..128 (powers of two), any even ``Dg >= 2`` (padded to a power of two >= 16 in
the scores kernel), pooling ``avg``/``max``/``min`` in any order, ``q_step`` any power of two up to
the block size. Limitations: forward only (training keeps the eager gate, which has a backward).
The projection is not fused into the pooling kernel: a fused Q pooling + projection (session 11, branch
``wip/gate-fused``) made the gate 1.3-1.7x slower on the H200 (narrow, latency-bound loads), and the pooled channels'
round trip costs ~0.04 ms at 32k (docs/experiments/prefill-gate-policy/README.md, session 11). Session 25's Gluon
kernels for Hopper (branch ``wip/qproj-ws``: Q by TMA, pooled and split into shared memory, wgmma products; persistent,
then warp-specialised) were slower too: Q's side 0.187 / 0.216 ms against the two kernels' 0.167 at 32k, the pooling
arithmetic on a multiprocessor's few warps the bound (same README, session 25).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .config import interpreting

__all__ = ["gate_logits_fwd"]

_POOL_CODES = {"avg": 0, "max": 1, "min": 2}
# Precision of the gate's fp32 dots. "ieee" (exact fp32 products, ``tl.dot(input_precision="ieee")``) has no
# tensor-core path on Hopper: at 128k it made the scores kernel 13.5 ms of a layer's 15.4 ms gate (H200, 6a58197, a
# profiled prefill). "tf32x3" (the name from the three-TF32-product scheme it replaced, same accuracy class): every
# fp32 operand of the projection and the scores kernel as two fp16 halves of a power-of-two-scaled value (22 bits) and
# three tensor-core products (the small * small one dropped), fp32 accumulation. "tf32": one TF32 product on fp32.
PRECISIONS = ("ieee", "tf32x3", "tf32")
DEFAULT_PRECISION = "tf32x3"
# The scores kernel's tile on the GPU: (query windows per program, key blocks per tile, warps, pipeline stages).
# The windows are BLOCK_I blocks' R windows each (BLOCK_I = windows // R): the N of the one transposed dot per key
# tile, the key blocks its M. Timed on the H200 (session 16, docs/experiments/prefill-gate-policy/session16, call 3;
# Llama-3.1-8B heads, the testbed's gate, R 4): (64, 64, 4, 2) 0.090 ms at 32k and 1.082 ms at 128k, against
# 0.113-0.142 / 1.30-1.89 for (64, 128, 8, 2), (128, 64, 8, 2 or 3), (32, 128, 8, 2), (64, 64, 8, 2), and as fast as
# one TF32 product (0.090 / 1.092): the three products are no longer what bounds it. The kernel before (windows x
# key tile, tl.dot's tf32x3) took 0.133 / 1.652 ms at its best tile, (128, 64, 8, 2). Offline sm_90 compile of the
# chosen tile (scores_compile.py): 255 registers, 8 bytes of spill, 100 KiB of shared memory (two programs an SM).
# IEEE fp32 (FMA dots over the full Dg 128) spills on every tile compiled; its fastest timed tile is (64, 64, 8, 2)
# (29.5 ms at 128k, session 8): "ieee" is a reference precision, not a fast path.
# The paper's gate (R 1; session 17, call 5): the same tile is the fastest at 128k (0.339 ms, seven others 0.362-0.593)
# and within 0.005 ms of the fastest at 32k, though the offline compile shows it spilling 224 bytes at R 1.
# On fp16 halves (session 24, calls 1 and 3): (64, 64, 4, 2) 0.0735-0.0752 ms at 32k and 0.869-0.899 at 128k, against
# 0.091-0.103 / 1.15-1.24 for (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2) and 0.116-0.122 / 1.39-1.47 for
# (128, 64, 4, 2), (64, 128, 4, 2); offline sm_90: 87-102 registers, no spill, 100 KiB of shared memory.
# Two key tiles a loop iteration at tf32x3 (session 25, docs/experiments/prefill-gate-policy/session25, call 4): the
# second tile's products are issued before the first's log-sum-exp, the same logits bit for bit; with one pipeline
# stage (the two tiles' loads are in flight together; two stages took 168 KiB, one program an SM) 0.0728 / 0.0731 ms
# against 0.0737 / 0.0732 for one tile an iteration at (64, 64, 4, 2) at 32k and 0.827 / 0.830 against 0.869 / 0.876
# at 128k (two rounds); two tiles at two stages 0.113 / 1.34.
SCORES_TILE = (64, 64, 4, 1)
SCORES_STEPS = 2
IEEE_SCORES_TILE = (64, 64, 8, 2)
# Under the interpreter: 16 windows, so that R = 2 and 4 put several blocks in a program and R = 1 sixteen.
_INTERP_SCORES_TILE = (16, 16, 4, 1)
# The projection kernel's tile on the GPU at "ieee" / "tf32" (fp32 rows; tf32x3 rows come split, PROJ_SPLIT_TILE
# below): (gate vectors per program, channels per step, warps, stages); two
# [BLOCK_M, Dg / 2] fp32 accumulators. 32 rows on 4 warps is under wgmma's 64-row minimum: Triton emits mma.sync,
# whose operands stay in registers (no shared-memory staging of tf32x3's split halves), and a program takes 196
# registers and 40 KiB (two programs an SM; proj_compile.py). Timed on the H200 (session 17,
# docs/experiments/prefill-gate-policy/session17, calls 1-2; Llama-3.1-8B heads, the testbed's gate), Q / K at 32k:
# 0.143 / 0.044 ms against 0.173 / 0.049 for the offline choice before (128, 32, 8, 3, wgmma) and 0.154-0.37 for
# twelve other tiles.
PROJ_TILE = (32, 32, 4, 3)
# The split projection's tile (fp16 halves, ``precision="tf32x3"``, the default): 64 rows on one warpgroup (wgmma).
# Since session 28 a step is one [64, Dg] product (three fp16 dots) into one running sum, split into the gate
# dimension's halves after the loop: offline sm_90 206 registers against 255, 6 HGMMA and 3 wgmma waits a loop against
# 12 and 6 for two [64, Dg / 2] products a step; the same bits, and on the H200 (session 28, call 1, two alternating
# rounds) the projection 0.0898 / 0.0899 ms against 0.0975 / 0.0975 at 32k, 0.3255 / 0.3261 against 0.3494 / 0.3498
# at 128k (the whole gate 0.2560 / 0.2564 against 0.2651 / 0.2651 at 32k). Q's job alone at 128k: 0.248 ms against
# 0.258-0.277 at (64, 16, 4, 4), (64, 64, 4, 2), (128, 32, 8, 3) and 0.239 at (64, 32, 4, 4); that 4-stage tile for
# both jobs (call 2, two rounds): 0.0895 / 0.0898 against 0.0899 / 0.0902 at 32k, inside the rounds' spread, not
# taken. Before, with two products a step, timed on the H200 (session 23,
# docs/experiments/prefill-gate-policy/session23, call 2; Llama-3.1-8B heads, the testbed's gate), Q / K at 32k:
# 0.091 / 0.101 ms (K's first row of the run; 0.047-0.050 after) against 0.094-0.153 / 0.047-0.114 at (64, 16, 4, 4),
# (64, 64, 4, 2), (64, 32, 8, 3), (128, 32, 8, 3), (32, 32, 4, 3), (32, 64, 4, 2); at 128k 0.287 / 0.102 against
# 0.296-0.524 / 0.088-0.152. The fp32 tile above at tf32x3: 0.144 / 0.063 (32k), 0.538 / 0.144 (128k).
PROJ_SPLIT_TILE = (64, 32, 4, 3)
# Registers a thread of the split projection may take at its default tile (Triton's ``maxnreg``). The kernel is bound by
# latency (Nsight Compute, session 27: stalls on the copies' barrier and the wgmma waits, the tensor pipe 31 % busy),
# and at 206 registers two of its 4-warp programs fit an SM; at 160 (offline sm_90: no spill; 168 spilled 12 bytes)
# three do, as its 72 KiB of shared memory allows. H200, session 28, call 4 (two alternating rounds, the same bits):
# 0.3039 / 0.3054 ms against 0.3227 / 0.3242 at 128k, 0.0892 / 0.0898 against 0.0896 / 0.0902 at 32k alone; in the
# 32k model the gate 8.31 / 8.32 ms a forward against 8.51 / 8.56. Other tiles (benchmarks) run uncapped.
PROJ_SPLIT_MAXNREG = 160
# The pooling launch's tile: (K blocks per program, Q windows per program, warps), both jobs in one launch (one warp
# count). Timed on the H200 (session 16, docs/experiments/prefill-gate-policy/session16, calls 2-3; Llama-3.1-8B
# heads, bf16), each job alone: at 32k the Q windows of 16 tokens take 0.1035 ms at (8 windows, 4 warps) or (4, 2)
# against 0.130-0.133 at (16, 4), (32, 8), (8, 2); the K blocks of 64 tokens 0.037-0.038 ms at (8, 2), (16, 4),
# (32, 8) against 0.044 at (8, 4), (4, 2), (16, 8); the same order at 128k. The loop before (16 windows, 4 warps, not
# unrolled): 0.135 / 0.076 ms. Both in one launch at this tile: 0.123 ms at 32k, 0.465 at 128k.
POOL_PAIR_TILE = (16, 8, 4)
_INTERP_POOL_PAIR_TILE = (16, 16, 4)
_INTERP_PROJ_TILE = (16, 16, 4, 1)


@triton.jit
def _pick(code: tl.constexpr, avg, mx, mn):
    if code == 0:
        return avg
    elif code == 1:
        return mx
    else:
        return mn


@triton.jit
def _pow2_scale(amax):
    """(2^(14 - e), 2^(e - 14)) for each ``amax >= 0`` with ``2^e <= amax < 2^(e + 1)`` (e clamped to -100..127): the
    scaled values stay under 2^15, inside fp16's range, and the largest ones keep fp16's full precision."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, -100), 127)
    return ((141 - e) << 23).to(tl.float32, bitcast=True), ((113 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _store_split(ptr, v, LO_OFFSET, mask, STORE_LO: tl.constexpr):
    """Stores fp32 ``v`` (|v| < 2^15) as fp16 ``hi`` at ``ptr`` and (``STORE_LO``) fp16 ``lo`` at ``ptr + LO_OFFSET``:
    ``hi`` is ``v`` rounded to fp16, ``lo`` the exact fp32 remainder ``v - hi`` rounded to fp16, so ``hi + lo`` holds
    22 significant bits of ``v`` (remainders under fp16's normal range keep an absolute error below 2^-25). Without
    ``lo``: for values that ``hi`` holds exactly (a 16-bit input's max / min, see :func:`_lo_pools`)."""
    hi = v.to(tl.float16)
    tl.store(ptr, hi, mask=mask)
    if STORE_LO:
        tl.store(ptr + LO_OFFSET, (v - hi.to(tl.float32)).to(tl.float16), mask=mask)


@triton.jit
def _pool_windows(
    X, Out, Inv, stride_xb, stride_xh, stride_xt, stride_ob, stride_oh, stride_on, T, NP, H, bh, wt,
    STEP: tl.constexpr, D: tl.constexpr, BLOCK_W: tl.constexpr,
    NPOOL: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, SPLIT: tl.constexpr,
    LO: tl.constexpr,
):  # fmt: skip
    """Pools windows ``wt * BLOCK_W ...`` of (batch, head) ``bh``, token by token: the loop over a window's ``STEP``
    tokens is unrolled, so their loads (one ``[BLOCK_W, D]`` row of each window) are all in flight together.
    ``SPLIT``: each row is written as fp16 halves of its values times a power of two (:func:`_store_split`), its
    inverse in ``Inv [B, H, NP]`` (contiguous): the ``hi`` halves of every pooling, then the ``lo`` halves of the
    poolings whose bit is set in ``LO`` (:func:`_lo_pools`), in pooling order; else fp32 channels."""
    NEED_MAX: tl.constexpr = P0 == 1 or (NPOOL > 1 and P1 == 1) or (NPOOL > 2 and P2 == 1)
    NEED_MIN: tl.constexpr = P0 == 2 or (NPOOL > 1 and P1 == 2) or (NPOOL > 2 and P2 == 2)
    b = bh // H
    h = bh % H
    rows = wt * BLOCK_W + tl.arange(0, BLOCK_W)  # pooling windows
    row_ok = rows < NP
    start = rows * STEP
    offs_d = tl.arange(0, D)
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    acc = tl.zeros([BLOCK_W, D], dtype=tl.float32)
    mx = tl.full([BLOCK_W, D], float("-inf"), dtype=tl.float32)
    mn = tl.full([BLOCK_W, D], float("inf"), dtype=tl.float32)
    for s in tl.static_range(STEP):
        tok = start + s
        ok = (row_ok & (tok < T))[:, None]
        x = tl.load(x_base + tok.to(tl.int64)[:, None] * stride_xt + offs_d[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        acc += x
        if NEED_MAX:
            mx = tl.where(ok, tl.maximum(mx, x), mx)
        if NEED_MIN:
            mn = tl.where(ok, tl.minimum(mn, x), mn)
    count = tl.where(row_ok, tl.minimum(T - start, STEP), 1).to(tl.float32)
    avg = acc / count[:, None]
    o_ptr = (
        Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        + rows.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    )  # fmt: skip
    smask = row_ok[:, None]
    v0 = _pick(P0, avg, mx, mn)
    v1 = _pick(P1, avg, mx, mn)
    v2 = _pick(P2, avg, mx, mn)
    if SPLIT:  # rows past NP (max -inf, min inf) zeroed: no inf - inf in the split; they are not stored
        v0 = tl.where(smask, v0, 0.0)
        v1 = tl.where(smask, v1, 0.0)
        v2 = tl.where(smask, v2, 0.0)
        amax = tl.abs(v0)
        if NPOOL > 1:
            amax = tl.maximum(amax, tl.abs(v1))
        if NPOOL > 2:
            amax = tl.maximum(amax, tl.abs(v2))
        scale, inv = _pow2_scale(tl.max(amax, axis=1))
        tl.store(Inv + bh.to(tl.int64) * NP + rows, inv, mask=row_ok)
        # pooling p's lo halves follow the hi ones, after the lo halves of the poolings before it that have them
        LO1: tl.constexpr = LO & 1
        LO2: tl.constexpr = (LO & 1) + ((LO >> 1) & 1)
        _store_split(o_ptr, v0 * scale[:, None], NPOOL * D, smask, (LO & 1) != 0)
        if NPOOL > 1:
            _store_split(o_ptr + D, v1 * scale[:, None], (NPOOL + LO1 - 1) * D, smask, (LO & 2) != 0)
        if NPOOL > 2:
            _store_split(o_ptr + 2 * D, v2 * scale[:, None], (NPOOL + LO2 - 2) * D, smask, (LO & 4) != 0)
    else:
        tl.store(o_ptr, v0, mask=smask)
        if NPOOL > 1:
            tl.store(o_ptr + D, v1, mask=smask)
        if NPOOL > 2:
            tl.store(o_ptr + 2 * D, v2, mask=smask)


@triton.jit
def _pool_kernel(
    XA, OutA, InvA, sxb_a, sxh_a, sxt_a, sob_a, soh_a, son_a, NP_A, H_A, TILES_A, PROGS_A,
    XB, OutB, InvB, sxb_b, sxh_b, sxt_b, sob_b, soh_b, son_b, NP_B, H_B, TILES_B,
    T,
    STEP_A: tl.constexpr, BLOCK_W_A: tl.constexpr, NPOOL_A: tl.constexpr,
    PA0: tl.constexpr, PA1: tl.constexpr, PA2: tl.constexpr, SPLIT_A: tl.constexpr, LO_A: tl.constexpr,
    STEP_B: tl.constexpr, BLOCK_W_B: tl.constexpr, NPOOL_B: tl.constexpr,
    PB0: tl.constexpr, PB1: tl.constexpr, PB2: tl.constexpr, SPLIT_B: tl.constexpr, LO_B: tl.constexpr,
    D: tl.constexpr,
):  # fmt: skip
    """Two pooling jobs in one launch (the gate's K blocks and Q windows): programs ``< PROGS_A`` pool input A,
    the rest input B (none when the grid has only ``PROGS_A`` programs), each job its own window and tile."""
    pid = tl.program_id(0)
    if pid < PROGS_A:
        _pool_windows(XA, OutA, InvA, sxb_a, sxh_a, sxt_a, sob_a, soh_a, son_a, T, NP_A, H_A, pid // TILES_A,
                      pid % TILES_A, STEP_A, D, BLOCK_W_A, NPOOL_A, PA0, PA1, PA2, SPLIT_A, LO_A)  # fmt: skip
    else:
        pid -= PROGS_A
        _pool_windows(XB, OutB, InvB, sxb_b, sxh_b, sxt_b, sob_b, soh_b, son_b, T, NP_B, H_B, pid // TILES_B,
                      pid % TILES_B, STEP_B, D, BLOCK_W_B, NPOOL_B, PB0, PB1, PB2, SPLIT_B, LO_B)  # fmt: skip


@triton.jit
def _rope_kernel(
    X, C, S,
    stride_xb, stride_xh, stride_xn,
    stride_cb, stride_cn,
    N, H, HALF,
    C_STEP: tl.constexpr, HALF_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Rotates ``BLOCK_N`` gate vectors of one head in place (rotate-half, fp32): row ``n`` with the cos/sin
    row ``n * C_STEP`` (1 for query windows, ``R`` for key blocks: their first window)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF_P)
    m = (n < N)[:, None] & (offs_j < HALF)[None, :]
    x_ptr = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + n.to(tl.int64)[:, None] * stride_xn
    x_ptr += offs_j[None, :]
    c_off = b.to(tl.int64) * stride_cb + (n * C_STEP).to(tl.int64)[:, None] * stride_cn + offs_j[None, :]
    x1 = tl.load(x_ptr, mask=m, other=0.0)
    x2 = tl.load(x_ptr + HALF, mask=m, other=0.0)
    cos1 = tl.load(C + c_off, mask=m, other=0.0).to(tl.float32)
    cos2 = tl.load(C + c_off + HALF, mask=m, other=0.0).to(tl.float32)
    sin1 = tl.load(S + c_off, mask=m, other=0.0).to(tl.float32)
    sin2 = tl.load(S + c_off + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(x_ptr, x1 * cos1 - x2 * sin1, mask=m)
    tl.store(x_ptr + HALF, x2 * cos2 + x1 * sin2, mask=m)


@triton.jit
def _project_rows(
    X, XInv, W, WInv, C, S, Out, OutInv,
    stride_xb, stride_xh, stride_xn,
    stride_wh, stride_wc,
    stride_cb, stride_cn,
    stride_ob, stride_oh, stride_on,
    N, HQ, G, CDIM, HALF, bh, mt, C_STEP, LO_POOLS,
    ROPE: tl.constexpr, HALF_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, D_POOL: tl.constexpr,
):  # fmt: skip
    """Gate vectors ``mt * BLOCK_M ...`` of (batch, query head) ``bh``: pooled rows of input head ``h // G`` times
    ``W[h]``, then (``ROPE``) rotate-half with the cos/sin row ``n * C_STEP``. The two halves of the gate dimension
    end up in two accumulators, so the rotation pairs channel ``j`` with ``j + HALF`` in registers (no second pass):
    without ``SPLIT`` they are accumulated apart; with it one ``[BLOCK_M, 2 * HALF_P]`` product a step (a wgmma of
    twice the width, half the waits on the tensor cores) is split after the loop.

    ``SPLIT``: rows and weights come as fp16 halves of scaled values (row ``[hi (CDIM) | lo]``, a head's weights
    ``[hi (CDIM rows) ; lo (CDIM rows)]``, inverse scales ``XInv [B, Hx, N]`` and ``WInv [Hq, Dg / 2]``); each step sums
    ``hi.lo + lo.hi + hi.hi`` (fp16 products, exact in the tensor cores' fp32) and adds it to the running sums, which
    are scaled back at the end. ``lo.lo`` (2^-22 of the product) is left out, as tf32x3 leaves it out. A row holds the
    ``lo`` halves of the poolings (``D_POOL`` channels each) whose bit is set in ``LO_POOLS``, in pooling order; the
    others' ``hi`` halves are exact, and their ``lo`` reads as zero without a load (:func:`_lo_pools`)."""
    b = bh // HQ
    h = bh % HQ
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_j = tl.arange(0, HALF_P)
    j_ok = offs_j < HALF
    x_base = X + b.to(tl.int64) * stride_xb + (h // G).to(tl.int64) * stride_xh + rows.to(tl.int64)[:, None] * stride_xn
    w_base = W + h.to(tl.int64) * stride_wh
    if SPLIT:
        w_lo = CDIM.to(tl.int64) * stride_wc
        # both halves of the gate dimension in one [BLOCK_M, 2 * HALF_P] product a step: column c is gate channel c
        # (c < HALF_P) or HALF + c - HALF_P, so that the halves come apart after the loop
        offs_c = tl.arange(0, 2 * HALF_P)
        col = tl.where(offs_c < HALF_P, offs_c, HALF + offs_c - HALF_P)
        c_ok = tl.where(offs_c < HALF_P, offs_c, offs_c - HALF_P) < HALF
        acc = tl.zeros([BLOCK_M, 2 * HALF_P], dtype=tl.float32)
        for k0 in range(0, CDIM, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < CDIM
            a_mask = row_ok[:, None] & k_ok[None, :]
            a_hi = tl.load(x_base + ks[None, :], mask=a_mask, other=0.0)
            pool = ks // D_POOL  # each channel's pooling; its lo half, if stored, after the earlier poolings' ones
            lo_ok = ((LO_POOLS >> pool) & 1) != 0
            lo_col = (tl.where(pool >= 1, LO_POOLS & 1, 0) + tl.where(pool >= 2, (LO_POOLS >> 1) & 1, 0)) * D_POOL
            a_lo = tl.load(x_base + CDIM + lo_col[None, :] + ks[None, :] % D_POOL, mask=a_mask & lo_ok[None, :],
                           other=0.0)  # fmt: skip
            w_ptr = w_base + ks.to(tl.int64)[:, None] * stride_wc + col[None, :]
            w_mask = k_ok[:, None] & c_ok[None, :]
            w_hi = tl.load(w_ptr, mask=w_mask, other=0.0)
            w_lo_t = tl.load(w_ptr + w_lo, mask=w_mask, other=0.0)
            # the step's products from zero, the small first, added to the running sums in fp32: chaining hi.hi
            # into the tensor cores' accumulator doubled the error (1.09e-6 against 4.90e-7 for the whole gate)
            acc += tl.dot(a_hi, w_hi, tl.dot(a_lo, w_hi, tl.dot(a_hi, w_lo_t)))
        acc1, acc2 = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF_P]), (0, 2, 1)))
        x_inv = tl.load(XInv + (b * (HQ // G) + h // G).to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        inv = x_inv[:, None] * tl.load(WInv + h * HALF + offs_j, mask=j_ok, other=0.0)[None, :]  # a row's, a pair's
        acc1 *= inv
        acc2 *= inv
    else:
        acc1 = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)
        for k0 in range(0, CDIM, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < CDIM
            a = tl.load(x_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ptr = w_base + ks.to(tl.int64)[:, None] * stride_wc + offs_j[None, :]
            w_mask = k_ok[:, None] & j_ok[None, :]
            w1 = tl.load(w_ptr, mask=w_mask, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF, mask=w_mask, other=0.0).to(tl.float32)
            acc1 = tl.dot(a, w1, acc1, input_precision=PRECISION)
            acc2 = tl.dot(a, w2, acc2, input_precision=PRECISION)
    m = row_ok[:, None] & j_ok[None, :]  # the tile's valid (row, gate channel) pairs: cos/sin loads and the store
    if ROPE:
        c_off = b.to(tl.int64) * stride_cb + (rows * C_STEP).to(tl.int64)[:, None] * stride_cn + offs_j[None, :]
        cos1 = tl.load(C + c_off, mask=m, other=0.0).to(tl.float32)
        cos2 = tl.load(C + c_off + HALF, mask=m, other=0.0).to(tl.float32)
        sin1 = tl.load(S + c_off, mask=m, other=0.0).to(tl.float32)
        sin2 = tl.load(S + c_off + HALF, mask=m, other=0.0).to(tl.float32)
        out1 = acc1 * cos1 - acc2 * sin1
        out2 = acc2 * cos2 + acc1 * sin2
    else:
        out1 = acc1
        out2 = acc2
    o_ptr = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows.to(tl.int64)[:, None] * stride_on
    o_ptr += offs_j[None, :]
    if SPLIT:  # the gate vectors split for the scores kernel: fp16 halves of the row times a power of two
        out1 = tl.where(m, out1, 0.0)
        out2 = tl.where(m, out2, 0.0)
        amax = tl.maximum(tl.max(tl.abs(out1), axis=1), tl.max(tl.abs(out2), axis=1))
        scale, inv = _pow2_scale(amax)
        tl.store(OutInv + (b * HQ + h).to(tl.int64) * N + rows, inv, mask=row_ok)
        _store_split(o_ptr, out1 * scale[:, None], 2 * HALF, m, True)
        _store_split(o_ptr + HALF, out2 * scale[:, None], 2 * HALF, m, True)
    else:
        tl.store(o_ptr, out1, mask=m)
        tl.store(o_ptr + HALF, out2, mask=m)


@triton.jit
def _project_kernel(
    XA, XInvA, WA, WInvA, OutA, OutInvA, sxb_a, sxh_a, sxn_a, swh_a, swc_a, sob_a, soh_a, son_a, N_A, G_A, CDIM_A,
    LO_A, TILES_A, PROGS_A,
    XB, XInvB, WB, WInvB, OutB, OutInvB, sxb_b, sxh_b, sxn_b, swh_b, swc_b, sob_b, soh_b, son_b, N_B, G_B, CDIM_B,
    LO_B, TILES_B,
    C, S, stride_cb, stride_cn, HQ, HALF, C_STEP_A, C_STEP_B,
    ROPE: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, D_POOL: tl.constexpr,
):  # fmt: skip
    """Two projection jobs in one launch (the gate's key blocks and query windows; same heads, gate dimension and
    rotary table): programs ``< PROGS_A`` project job A, the rest job B (none when the grid stops at ``PROGS_A``).
    The job's pointers and sizes are picked as scalars and one body runs (two inlined bodies spilled registers)."""
    pid = tl.program_id(0)
    is_a = pid < PROGS_A
    t = tl.where(is_a, pid, pid - PROGS_A)
    tiles = tl.where(is_a, TILES_A, TILES_B)
    _project_rows(
        tl.where(is_a, XA, XB), tl.where(is_a, XInvA, XInvB), tl.where(is_a, WA, WB), tl.where(is_a, WInvA, WInvB),
        C, S, tl.where(is_a, OutA, OutB), tl.where(is_a, OutInvA, OutInvB),
        tl.where(is_a, sxb_a, sxb_b), tl.where(is_a, sxh_a, sxh_b), tl.where(is_a, sxn_a, sxn_b),
        tl.where(is_a, swh_a, swh_b), tl.where(is_a, swc_a, swc_b), stride_cb, stride_cn,
        tl.where(is_a, sob_a, sob_b), tl.where(is_a, soh_a, soh_b), tl.where(is_a, son_a, son_b),
        tl.where(is_a, N_A, N_B), HQ, tl.where(is_a, G_A, G_B), tl.where(is_a, CDIM_A, CDIM_B), HALF, t // tiles,
        t % tiles, tl.where(is_a, C_STEP_A, C_STEP_B), tl.where(is_a, LO_A, LO_B), ROPE, HALF_P, BLOCK_M, BLOCK_K,
        PRECISION, SPLIT, D_POOL,
    )  # fmt: skip


@triton.jit
def _split_weights_kernel(
    WA, OutA, InvA, WB, OutB, InvB, HQ, C_A, C_B, HALF, J_TILES, CP: tl.constexpr, BLOCK_J: tl.constexpr
):  # fmt: skip
    """Gate channels ``j`` and ``j + HALF`` (``j`` in a tile of ``BLOCK_J``) of one head's weights ``[C, 2 * HALF]``
    (contiguous, any float dtype) per program, programs ``< HQ * J_TILES`` for ``WA``, the rest for ``WB``: each
    such pair of columns times the power of two that puts its largest under 2^15 (the whole columns are in the
    program: one read), written as fp16 ``[hi (C rows) ; lo (C rows)]`` per head, the inverse scales to ``Inv [Hq,
    HALF]``. A scale per output channel leaves the dot's sums intact, and one per rotate-half pair commutes with
    the rotation."""
    pid = tl.program_id(0)
    is_a = pid < HQ * J_TILES
    t = tl.where(is_a, pid, pid - HQ * J_TILES)
    h = t // J_TILES
    c_dim = tl.where(is_a, C_A, C_B)
    rows = tl.arange(0, CP)
    cols = (t % J_TILES) * BLOCK_J + tl.arange(0, BLOCK_J)
    ok = (rows < c_dim)[:, None] & (cols < HALF)[None, :]
    offs = h.to(tl.int64) * c_dim * 2 * HALF + rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    w = tl.where(is_a, WA, WB) + offs
    w1 = tl.load(w, mask=ok, other=0.0).to(tl.float32)
    w2 = tl.load(w + HALF, mask=ok, other=0.0).to(tl.float32)
    scale, inv = _pow2_scale(tl.maximum(tl.max(tl.abs(w1), axis=0), tl.max(tl.abs(w2), axis=0)))
    tl.store(tl.where(is_a, InvA, InvB) + h * HALF + cols, inv, mask=cols < HALF)
    out = tl.where(is_a, OutA, OutB) + offs + h.to(tl.int64) * c_dim * 2 * HALF  # [hi ; lo] a head: twice C rows
    lo = c_dim * 2 * HALF
    _store_split(out, w1 * scale[None, :], lo, ok, True)
    _store_split(out + HALF, w2 * scale[None, :], lo, ok, True)


@triton.jit
def _gate_scores_kernel(
    QG, QInv, KG, KInv, Out,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_oi,
    NS, NB, HQ, DG, n_row_tiles, sqrt_dg, inv_sqrt_dg,
    R: tl.constexpr, DG_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
    Q_SPLIT: tl.constexpr, STEPS: tl.constexpr, UPPER: tl.constexpr,
):  # fmt: skip
    """Logits of ``BLOCK_I`` query blocks of one head against every key block (see the module docstring).

    Each key tile is computed transposed, ``[BLOCK_J keys, BLOCK_I * R windows] = kg . qg^T``: the program's
    windows (loop-invariant) are the dot's shared-memory operand, placed there once, and each key tile the
    register operand. At ``tf32x3`` both operands are fp16 halves of power-of-two-scaled gate vectors (the keys
    written so by the projection, with an inverse scale a block; the windows too, or split here once when they come
    fp32, the paper's gate's rotated pooled Q) and each tile sums three fp16 products (hi.lo, lo.hi, hi.hi, the
    small first), scaled back by the two inverse scales. (Until session 24: TF32 halves split in the kernel, the key
    tile in every step.)
    """
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    it = n_row_tiles - 1 - tl.program_id(1)  # long (late) rows first
    rows = it * BLOCK_I + tl.arange(0, BLOCK_I)  # query blocks
    row_ok = rows < NB
    wins = it * (BLOCK_I * R) + tl.arange(0, BLOCK_I * R)  # their query windows
    win_ok = wins < NS  # a partial last block has fewer windows
    offs_d = tl.arange(0, DG_P)
    d_ok = offs_d < DG
    q_base = QG + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = KG + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    o_head = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_base = o_head + rows.to(tl.int64)[None, :] * stride_oi  # transposed tiles: [BLOCK_J, BLOCK_I]
    q_ptr = q_base + wins.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
    q_mask = win_ok[:, None] & d_ok[None, :]
    if PRECISION == "tf32x3":  # fp16 halves of scaled gate vectors (the keys come split; the windows split here or too)
        if Q_SPLIT:
            q_hi = tl.load(q_ptr, mask=q_mask, other=0.0)
            q_lo = tl.load(q_ptr + DG, mask=q_mask, other=0.0)
            q_inv = tl.load(QInv + bh.to(tl.int64) * NS + wins, mask=win_ok, other=0.0)
        else:
            q = tl.load(q_ptr, mask=q_mask, other=0.0)
            scale, q_inv = _pow2_scale(tl.max(tl.abs(q), axis=1))
            v = q * scale[:, None]
            q_hi = v.to(tl.float16)
            q_lo = (v - q_hi.to(tl.float32)).to(tl.float16)
        # 1 / sqrt(Dg) joins the windows' inverse scales (powers of two: exactly), so each logit takes one multiply:
        # a division per logit was a third of the key loop's instructions (offline sm_90 SASS, session 24)
        q_inv = q_inv * inv_sqrt_dg
        q_hi = tl.trans(q_hi)  # [DG_P, BLOCK_I * R]
        q_lo = tl.trans(q_lo)
    else:
        q_hi = tl.trans(tl.load(q_ptr, mask=q_mask, other=0.0))  # fp32 windows (one dot)
        q_lo = q_hi  # unused at these precisions
        q_inv = q_hi
    # key tiles up to the one holding the last row's diagonal, STEPS a loop iteration: their products are issued
    # before the first tile's log-sum-exp, which then runs while the tensor cores work on the next (a tile past the
    # diagonal in the last iteration is all -inf, as the second loop writes it); a loop without a branch, which the
    # compiler can pipeline
    n_live = tl.minimum(it * BLOCK_I + BLOCK_I, NB)
    for j0 in range(0, n_live, STEPS * BLOCK_J):
        x = _key_tile(k_base, KInv, bh, j0, offs_d, d_ok, q_hi, q_lo, q_inv, stride_kn, NB, DG, sqrt_dg, BLOCK_J,
                      PRECISION)  # fmt: skip
        if STEPS == 2:
            x2 = _key_tile(k_base, KInv, bh, j0 + BLOCK_J, offs_d, d_ok, q_hi, q_lo, q_inv, stride_kn, NB, DG, sqrt_dg,
                           BLOCK_J, PRECISION)  # fmt: skip
        _store_tile(x, j0, rows, row_ok, win_ok, o_base, NB, R, BLOCK_I, BLOCK_J)
        if STEPS == 2:
            _store_tile(x2, j0 + BLOCK_J, rows, row_ok, win_ok, o_base, NB, R, BLOCK_I, BLOCK_J)
    if UPPER:  # key tiles wholly above the diagonal: -inf without arithmetic
        o_rows = o_head + rows.to(tl.int64)[:, None] * stride_oi
        for j0 in range(tl.cdiv(n_live, STEPS * BLOCK_J) * STEPS * BLOCK_J, NB, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            smask = row_ok[:, None] & (cols < NB)[None, :]
            tl.store(o_rows + cols[None, :], tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32), mask=smask)


@triton.jit
def _key_tile(k_base, KInv, bh, j0, offs_d, d_ok, q_hi, q_lo, q_inv, stride_kn, NB, DG, sqrt_dg,
              BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """Key blocks ``j0 .. j0 + BLOCK_J`` against the program's windows: [BLOCK_J, BLOCK_I * R] scaled logits (keys past
    NB read as zero). At tf32x3 ``q_hi`` / ``q_lo`` are the windows' transposed fp16 halves and ``q_inv`` their inverse
    scales (times 1 / sqrt(Dg)); else ``q_hi`` is the transposed fp32 windows."""
    cols = j0 + tl.arange(0, BLOCK_J)
    col_ok = cols < NB
    k_ptr = k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
    k_mask = col_ok[:, None] & d_ok[None, :]
    if PRECISION == "tf32x3":
        k_hi = tl.load(k_ptr, mask=k_mask, other=0.0)
        k_lo = tl.load(k_ptr + DG, mask=k_mask, other=0.0)
        k_inv = tl.load(KInv + bh.to(tl.int64) * NB + cols, mask=col_ok, other=0.0)
        x = tl.dot(k_hi, q_hi, tl.dot(k_lo, q_hi, tl.dot(k_hi, q_lo)))  # the small products first
        return x * (k_inv[:, None] * q_inv[None, :])  # one rounding (1 / sqrt(Dg)'s aside)
    else:  # the reference precisions divide as the eager gate does
        return tl.dot(tl.load(k_ptr, mask=k_mask, other=0.0), q_hi, input_precision=PRECISION) / sqrt_dg


@triton.jit
def _store_tile(x, j0, rows, row_ok, win_ok, o_base, NB, R: tl.constexpr, BLOCK_I: tl.constexpr,
                BLOCK_J: tl.constexpr):  # fmt: skip
    """A key tile's logits from its window scores ``x`` [BLOCK_J, BLOCK_I * R]: the log-sum-exp over each block's
    ``R`` windows, ``-inf`` above the diagonal, stored transposed (``o_base`` + key block)."""
    cols = j0 + tl.arange(0, BLOCK_J)
    if R == 1:
        lse = x
    else:
        x = tl.reshape(tl.where(win_ok[None, :], x, float("-inf")), [BLOCK_J, BLOCK_I, R])
        m = tl.max(x, axis=2)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # every window masked: rows past NB
        acc = tl.sum(tl.exp(x - m_safe[:, :, None]), axis=2)
        lse = m + tl.log(tl.where(acc > 0.0, acc, 1.0))  # acc is 0 only on rows past NB
    lse = tl.where(cols[:, None] <= rows[None, :], lse, float("-inf"))  # [BLOCK_J, BLOCK_I]
    tl.store(o_base + cols[:, None], lse, mask=row_ok[None, :] & (cols < NB)[:, None])


def _rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c_step: int) -> None:
    """Rotates gate vectors x [B, H, N, Dg] fp32 in place: row n with cos/sin [B or 1, *, Dg] row ``n * c_step``."""
    b, h, n, dg = x.shape
    block_n = 32
    _rope_kernel[(b * h, triton.cdiv(n, block_n))](
        x, cos, sin,
        x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        n, h, dg // 2,
        C_STEP=c_step, HALF_P=triton.next_power_of_2(dg // 2), BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip


def _split_weights(w: torch.Tensor, second: torch.Tensor | None = None):
    """Weights [Hq, C, Dg] (and ``second``, [Hq, C2, Dg], in the same launch) -> (fp16 halves [Hq, 2 * C, Dg]: hi
    rows then lo rows of each column pair (j, j + Dg / 2) times a power of two, inverse scales [Hq, Dg / 2] fp32)
    each: the projection's ``SPLIT`` operands (one launch; 12 MiB read at Llama-3.1-8B heads). The gate calls it through
    :func:`_split_weights_cached`."""
    ws = [w] if second is None else [w, second]
    ws = [x if x.is_contiguous() else x.contiguous() for x in ws]
    outs = [(torch.empty(x.shape[0], 2 * x.shape[1], x.shape[2], dtype=torch.float16, device=x.device),
             torch.empty(x.shape[0], x.shape[2] // 2, dtype=torch.float32, device=x.device)) for x in ws]  # fmt: skip
    b = len(ws) - 1  # job B: the second weights, or the first again with no program reaching it
    hq, _, dg = w.shape
    block_j = 8 if interpreting() else 16
    j_tiles = triton.cdiv(dg // 2, block_j)
    _split_weights_kernel[(hq * j_tiles * len(ws),)](
        ws[0], *outs[0], ws[b], *outs[b], hq, ws[0].shape[1], ws[b].shape[1], dg // 2, j_tiles,
        CP=triton.next_power_of_2(max(x.shape[1] for x in ws)), BLOCK_J=block_j, num_warps=8,
    )  # fmt: skip
    return outs[0] if second is None else outs


def _split_weights_cached(w: torch.Tensor, second: torch.Tensor | None = None):
    """:func:`_split_weights`, kept on ``w`` (an attribute of the weight tensor, the gate's parameter) and made again
    when ``w`` or ``second`` changes: an in-place update moves its version counter, new data its address (the entry
    holds the weights it was made from, so their memory cannot be reused under a stale entry). Inference and bf16
    prefill calls thus split a layer's weights once instead of every forward (one launch, 13 us a layer at Llama-3.1-8B
    heads on the H200, session 25). Not kept inside a CUDA graph capture (a tensor made there holds its values only
    once the graph replays) nor for inference-mode tensors (no version counter). Costs the weights' bytes again (fp16
    halves of fp32 weights) for as long as the gate lives."""
    ws = (w,) if second is None else (w, second)
    if (w.is_cuda and torch.cuda.is_current_stream_capturing()) or any(x.is_inference() for x in ws):
        return _split_weights(w, second)
    key = tuple((x.data_ptr(), x._version, tuple(x.shape), x.dtype, x.device) for x in ws)
    entry = getattr(w, "_seerattn_split", None)
    if entry is None or entry[0] != key:
        entry = (key, tuple(x.detach() for x in ws), _split_weights(w, second))
        w._seerattn_split = entry
    return entry[2]


class SplitRows(NamedTuple):
    """Pooled rows split for the projection (:func:`_pool` with ``split``): ``halves`` fp16 [B, H, N, C + C_lo], each
    row times a power of two as the ``hi`` halves of its C = len(poolings) * D channels, then the ``lo`` halves of the
    poolings whose bit is set in ``lo_pools`` (:func:`_lo_pools`), in pooling order; ``inv`` fp32 [B, H, N] the inverse
    scales; ``pool_dim`` D, the channels a pooling."""

    halves: torch.Tensor
    inv: torch.Tensor
    lo_pools: int
    pool_dim: int


def _lo_pools(poolings: tuple[str, ...], dtype: torch.dtype) -> int:
    """Bit p set where pooling p's split rows need ``lo`` halves: an average always; a max or min of a 16-bit input is
    one of its values, whose 8 (bf16) or 11 (fp16) significant bits fp16's ``hi`` holds exactly once scaled (down to
    2^-17 of fp16's range, under which ``lo`` would round to zero as well), so its ``lo`` is neither written nor read:
    a third less of the split rows' bytes for the testbed's poolings."""
    exact = dtype in (torch.float16, torch.bfloat16)
    return sum(1 << p for p, name in enumerate(poolings) if name == "avg" or not exact)


def _project_job(x, w: torch.Tensor, block_m: int, split: bool):
    """(output, launch arguments, programs, channels) of one projection job of :func:`_project_kernel`. ``x``: pooled
    channels [B, Hx, N, C] fp32, or with ``split`` a :class:`SplitRows`, and ``w`` then a pair from
    :func:`_split_weights`."""
    lo_pools = 0
    if split:
        x, x_inv, lo_pools, _ = x  # the pooling width goes to the launch's constexpr (:func:`_project`)
    else:
        x_inv = x  # without split the inverse-scale pointers are dummies, never read
    w, w_inv = w if split else (w, w)
    b, hx, n, _ = x.shape
    hq, c, dg = w.shape
    c = c // 2 if split else c  # the split weights: hi rows then lo rows
    if split:  # gate vectors split too: fp16 halves [B, Hq, N, 2 * Dg] and inverse scales [B, Hq, N]
        o = torch.empty(b, hq, n, 2 * dg, dtype=torch.float16, device=x.device)
        out = (o, torch.empty(b, hq, n, dtype=torch.float32, device=x.device))
        o_inv = out[1]
    else:
        out = o = o_inv = torch.empty(b, hq, n, dg, dtype=torch.float32, device=x.device)  # o_inv: a dummy
    tiles = triton.cdiv(n, block_m)
    args = [x, x_inv, w, w_inv, o, o_inv, *x.stride()[:3], *w.stride()[:2], *o.stride()[:3], n, hq // hx, c, lo_pools,
            tiles]  # fmt: skip
    return out, args, b * hq * tiles, c


def _project(
    x,
    w: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    c_step: int,
    precision: str,
    tile: tuple[int, int, int, int] | None = None,
    second: tuple | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pooled channels x [B, Hx, N, C] fp32 times w [Hq, C, Dg] (query head h reads input head h // (Hq / Hx)), rotated
    with cos/sin [B or 1, *, Dg] row ``n * c_step`` when given -> gate vectors [B, Hq, N, Dg] fp32. At
    ``precision="tf32x3"`` x is :func:`_pool`'s :class:`SplitRows` and the weights are split here:
    three fp16 products of 22-bit operands (:func:`_project_rows`' ``SPLIT``); else one ``tl.dot`` of that precision on
    fp32 rows. ``tile``: (rows, channels per step, warps, stages), default :data:`PROJ_SPLIT_TILE` at tf32x3, else
    :data:`PROJ_TILE` (benchmarks try others; the default split tile runs under :data:`PROJ_SPLIT_MAXNREG`).
    ``second``: (x2, w2, c_step2) projected in the same launch (same B, Hq, Dg, table and precision): returns both
    outputs."""
    split = precision == "tf32x3"
    dg = w.shape[2]
    default = PROJ_SPLIT_TILE if split else PROJ_TILE
    block_m, block_k, num_warps, num_stages = tile or (_INTERP_PROJ_TILE if interpreting() else default)
    if split:
        halves = _split_weights_cached(w, None if second is None else second[1])
        w_a, w_b = (halves, None) if second is None else halves
    else:
        w_a, w_b = w, None if second is None else second[1]
    out_a, args_a, progs_a, c_a = _project_job(x, w_a, block_m, split)
    if second is None:  # job B unused: job A's arguments in its place, no program reaches it
        out_b, args_b, progs_b, c_b, c_step_b = out_a, args_a, 0, c_a, c_step
    else:
        out_b, args_b, progs_b, c_b = _project_job(second[0], w_b, block_m, split)
        c_step_b = second[2]
    pool_dim = x.pool_dim if split else 16  # unused without the split
    if split and second is not None and second[0].pool_dim != pool_dim:
        raise ValueError(f"_project: both jobs' rows need one pooling width, got {pool_dim} and {second[0].pool_dim}")
    rope = cos is not None
    c_ref, s_ref = (cos, sin) if rope else (out_a, out_a)  # dummy pointers without RoPE
    c_strides = ((cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)) if rope else (0, 0)
    _project_kernel[(progs_a + progs_b,)](
        *args_a, progs_a, *args_b, c_ref, s_ref, *c_strides, w.shape[0], dg // 2, c_step, c_step_b,
        ROPE=rope, HALF_P=max(16, triton.next_power_of_2(dg // 2)),
        BLOCK_M=block_m, BLOCK_K=min(block_k, max(16, triton.next_power_of_2(max(c_a, c_b)))), PRECISION=precision,
        SPLIT=split, D_POOL=pool_dim, num_warps=num_warps, num_stages=num_stages,
        maxnreg=PROJ_SPLIT_MAXNREG if split and tile is None else None,
    )  # fmt: skip
    return out_a if second is None else (out_a, out_b)


def _pool_job(x: torch.Tensor, step: int, poolings: tuple[str, ...], block_w: int, split: bool):
    """(output, launch arguments, constexprs, programs) of one pooling job of :func:`_pool_kernel`; the output is
    the pooled channels [B, H, N, C] fp32, or with ``split`` a :class:`SplitRows`."""
    b, h, t, d = x.shape
    n = -(-t // step)
    c = len(poolings) * d
    lo_pools = _lo_pools(poolings, x.dtype) if split else 0
    if split:
        c_lo = d * lo_pools.bit_count()
        out = SplitRows(torch.empty(b, h, n, c + c_lo, dtype=torch.float16, device=x.device),
                        torch.empty(b, h, n, dtype=torch.float32, device=x.device), lo_pools, d)  # fmt: skip
        o, inv = out.halves, out.inv
    else:
        out = o = inv = torch.empty(b, h, n, c, dtype=torch.float32, device=x.device)  # inv: a dummy, never read
    tiles = triton.cdiv(n, block_w)
    args = [x, o, inv, *x.stride()[:3], *o.stride()[:3], n, h, tiles]
    codes = [_POOL_CODES[p] for p in poolings] + [0] * (3 - len(poolings))
    return out, args, [step, block_w, len(poolings), *codes, split, lo_pools], b * h * tiles


def _pool(
    x: torch.Tensor,
    step: int,
    poolings: tuple[str, ...],
    tile: tuple[int, int],
    split: bool = False,
    second: tuple[torch.Tensor, int, tuple[str, ...], int, bool] | None = None,
):
    """x [B, H, T, D] -> pooled channels [B, H, ceil(T / step), len(poolings) * D] fp32, or with ``split`` the
    :class:`SplitRows` :func:`_project` takes at ``tf32x3`` (each pooled row times a power of two as fp16 halves, and
    the inverse scales). ``tile``: (windows per program, warps). ``second``: (x2, step2, poolings2, windows per
    program, split2) pooled in the same launch (same B, T, D): returns both outputs."""
    block_w, warps = tile
    out_a, args_a, const_a, progs_a = _pool_job(x, step, poolings, block_w, split)
    if second is None:  # job B unused: job A's arguments in its place, no program reaches it
        out_b, args_b, const_b, progs_b = out_a, args_a, const_a, 0
    else:
        out_b, args_b, const_b, progs_b = _pool_job(*second)
    _pool_kernel[(progs_a + progs_b,)](
        *args_a, progs_a, *args_b, x.shape[2], *const_a, *const_b, D=x.shape[3], num_warps=warps
    )
    return out_a if second is None else (out_a, out_b)


def _scores(
    qg: torch.Tensor,
    kg: torch.Tensor,
    r: int,
    precision: str,
    tile: tuple[int, int, int, int] | None = None,
    steps: int | None = None,
    causal_only: bool = False,
) -> torch.Tensor:
    """Rotated gate vectors qg [B, Hq, NS, Dg] (query windows), kg [B, Hq, NB, Dg] (key blocks), R windows a block
    -> logits [B, Hq, NB, NB] fp32. ``tile``: (windows, key blocks, warps, stages), default :data:`SCORES_TILE`;
    ``steps``: key tiles a loop iteration (1 or 2, default :data:`SCORES_STEPS` at tf32x3, else 1; the same logits
    either way). ``causal_only``: the key tiles wholly above the diagonal are not written (their entries are
    unspecified), for a consumer that reads only the causal part."""
    if steps not in (None, 1, 2):  # the kernel takes one or two key tiles an iteration; more would skip tiles
        raise ValueError(f"_scores: steps must be None, 1 or 2 (key tiles a loop iteration), got {steps!r}")
    if steps is None:
        steps = SCORES_STEPS if precision == "tf32x3" else 1
    k_split = precision == "tf32x3"  # the keys come split (:func:`_project`'s output), the windows split or fp32
    q_split = isinstance(qg, tuple)
    qg, q_inv = qg if q_split else (qg, qg)  # without the split halves the inverse-scale pointers are dummies
    kg, k_inv = kg if k_split else (kg, kg)
    b, hq, ns, dg = qg.shape
    dg = dg // 2 if q_split else dg
    nb = kg.shape[2]
    out = torch.empty(b, hq, nb, nb, dtype=torch.float32, device=qg.device)
    if tile is None and interpreting():
        tile = _INTERP_SCORES_TILE
    elif tile is None:
        tile = IEEE_SCORES_TILE if precision == "ieee" else SCORES_TILE
    windows, block_j, num_warps, num_stages = tile
    block_i = max(1, windows // r)  # a block's R windows never split between programs
    n_row_tiles = triton.cdiv(nb, block_i)
    _gate_scores_kernel[(b * hq, n_row_tiles)](
        qg, q_inv, kg, k_inv, out,
        qg.stride(0), qg.stride(1), qg.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        ns, nb, hq, dg, n_row_tiles, math.sqrt(dg), 1.0 / math.sqrt(dg),
        R=r, DG_P=max(16, triton.next_power_of_2(dg)), BLOCK_I=block_i, BLOCK_J=block_j, PRECISION=precision,
        Q_SPLIT=q_split, STEPS=steps, UPPER=not causal_only, num_warps=num_warps, num_stages=num_stages,
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
    precision: str = DEFAULT_PRECISION,
    causal_only: bool = False,
) -> torch.Tensor:
    """Pool, project, score (inputs already validated by the caller).

    q: [B, Hq, T, D], k: [B, Hkv, T, D] (unit last stride); k_proj [Hq, Ck * D, Dg]; q_proj
    [Hq, Cq * D, Dg] or None (pooled Q used as is: one pooling, Dg == D); cos/sin [B or 1, NS, Dg]
    with unit last stride, or None (no RoPE). ``precision``: the projection's and the scores kernel's dot precision, one
    of :data:`PRECISIONS` (the interpreter computes every one in exact fp32). Returns logits [B, Hq, NB, NB] fp32,
    ``-inf`` above the block diagonal; with ``causal_only`` the entries above it are unspecified (not written).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"gate scores precision must be one of {PRECISIONS}, got {precision!r}")
    r = block_size // q_step
    # the projections and RoPE in one kernel each, once per gate vector (not on every key tile of the scores
    # kernel): query windows at their first position, key blocks at their first window's (cos/sin row n * R);
    # K is pooled once per KV head and read by each query head of its group. K's jobs come first in each launch:
    # fewer, longer programs, which Q's many short ones then fill around.
    k_windows, q_windows, warps = _INTERP_POOL_PAIR_TILE if interpreting() else POOL_PAIR_TILE
    split = precision == "tf32x3"  # the projection's operands come split from the pooling (see _project)
    kp, qp = _pool(k, block_size, k_pooling, (k_windows, warps), split,
                   second=(q, q_step, q_pooling, q_windows, split and q_proj is not None))  # fmt: skip
    if q_proj is not None:
        kg, qg = _project(kp, k_proj, cos, sin, r, precision, second=(qp, q_proj, 1))
    else:
        kg, qg = _project(kp, k_proj, cos, sin, r, precision), qp
        if cos is not None:
            _rope_(qg, cos, sin, 1)
    return _scores(qg, kg, r, precision, causal_only=causal_only)
