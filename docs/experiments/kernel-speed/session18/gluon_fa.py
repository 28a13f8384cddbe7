"""Spike (session 18, issue 16's dense / block-64 kernel targets): a causal FlashAttention forward written in Gluon
(Triton 3.6's layout-explicit language) for Hopper, to measure what explicit wgmma scheduling buys over the Triton
kernels, which the compiler schedules. Not library code: dense causal only, bf16, D 128, T a multiple of 128.

The one idea under test (``LOOKAHEAD``): FlashAttention-3's intra-warpgroup overlap. Step j issues the next key
tile's ``S = Q K^T`` on the tensor cores (async wgmma) *before* the softmax of step j, so the exponentials run while
the next scores are computed; ``LOOKAHEAD=False`` is the same kernel with each wgmma waited at once (what a
compiler-scheduled loop does when the softmax needs the scores it just asked for).

Program: 128 query rows (8 warps, two warpgroups of 64 rows), 64-key steps, K / V tiles copied with cp.async into a
``STAGES``-slot ring in shared memory, Q copied once; heaviest query tiles first.

    python docs/experiments/kernel-speed/session18/gluon_fa.py compile      # offline sm_90 (CPU): ptxas report
    python docs/experiments/kernel-speed/session18/gluon_fa.py check        # GPU: error against SDPA (fp32 math)
    python docs/experiments/kernel-speed/session18/gluon_fa.py bench        # GPU: ms and TFLOP/s beside ours, SDPA
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_M, BLOCK_N, HEAD_DIM, WARPS = 128, 64, 128, 8
# (key steps, pipeline stages): 64-key steps with 3 or 4 K/V slots, 128-key steps with 2 (shared memory)
VARIANTS = ((64, 3), (64, 4), (128, 2))


@gluon.jit
def _copy_kv(K0, V0, k_ring, v_ring, j, slot, stride_kt, stride_vt,
             BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, ld: gl.constexpr):  # fmt: skip
    """cp.async of key tile ``j`` (K and V rows j*BLOCK_N ...) into ring slot ``slot``, one commit group."""
    rows = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    r64 = rows.to(gl.int64)[:, None]
    async_copy.async_copy_global_to_shared(k_ring.index(slot), K0 + r64 * stride_kt + cols[None, :])
    async_copy.async_copy_global_to_shared(v_ring.index(slot), V0 + r64 * stride_vt + cols[None, :])
    async_copy.commit_group()


@gluon.jit
def _fa_fwd(
    Q, K, V, Out, qk_scale,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_vh, stride_vt, stride_oh, stride_ot,
    T, HQ, GROUP, n_tiles,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
    LOOKAHEAD: gl.constexpr,
):  # fmt: skip
    WARPS: gl.constexpr = gl.num_warps()
    # wgmma accumulators: warps stacked along the rows (two warpgroups of 64 rows)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # 16-byte cp.async vectors: a warp covers 2 rows x 128 columns
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [WARPS, 1], [1, 0])

    pid = gl.program_id(0)
    h = pid % HQ  # batch 1 in the spike: one program per (head, query tile)
    tile = n_tiles - 1 - pid // HQ  # heaviest (last) tiles first
    start_m = tile * BLOCK_M
    kvh = h // GROUP
    Q0 = Q + h.to(gl.int64) * stride_qh
    K0 = K + kvh.to(gl.int64) * stride_kh
    V0 = V + kvh.to(gl.int64) * stride_vh

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, HEAD_DIM], smem)
    k_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], smem)
    v_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], smem)

    q_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    d_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    async_copy.async_copy_global_to_shared(q_smem, Q0 + q_rows.to(gl.int64)[:, None] * stride_qt + d_cols[None, :])
    async_copy.commit_group()

    n_full = start_m // BLOCK_N  # key tiles left of the tile's first row: no mask
    n = (start_m + BLOCK_M) // BLOCK_N  # up to the diagonal (T a multiple of BLOCK_M)
    for i in gl.static_range(STAGES - 1):
        if i < n:
            _copy_kv(K0, V0, k_ring, v_ring, i, i, stride_kt, stride_vt, BLOCK_N, HEAD_DIM, ld)
        else:
            async_copy.commit_group()  # empty group: the group count stays what the waits expect

    rows_s = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    # tile 0 (and Q) present: groups left in flight are tiles 1 .. STAGES-2
    async_copy.wait_group(STAGES - 2)
    gl.thread_barrier()
    fence_async_shared()
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False)
    for j in range(0, n):
        slot = j % STAGES
        # refill the slot tile j-1 used (its wgmmas were waited at the end of step j-1)
        nxt = j + STAGES - 1
        if nxt < n:
            _copy_kv(K0, V0, k_ring, v_ring, nxt, nxt % STAGES, stride_kt, stride_vt, BLOCK_N, HEAD_DIM, ld)
        else:
            async_copy.commit_group()
        if LOOKAHEAD:
            # tile j+1 present (groups in flight: j+2 .. j+STAGES-1), its scores issued now, waited after the PV
            async_copy.wait_group(STAGES - 2)
            gl.thread_barrier()
            fence_async_shared()
            s_next = warpgroup_mma(q_smem, k_ring.index((j + 1) % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)  # fmt: skip
        x = s * qk_scale
        if j >= n_full:
            keep = (j * BLOCK_N + cols_s)[None, :] <= rows_s[:, None]
            x = gl.where(keep, x, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(x, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        if LOOKAHEAD:
            acc = warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)
            s_next, acc = warpgroup_mma_wait(0, deps=[s_next, acc])
            s = s_next
        else:
            acc = warpgroup_mma(p16, v_ring.index(slot), acc)
            async_copy.wait_group(STAGES - 2)
            gl.thread_barrier()
            fence_async_shared()
            s = warpgroup_mma(q_smem, k_ring.index((j + 1) % STAGES).permute((1, 0)), s_zero, use_acc=False)
        gl.thread_barrier()  # every warp is done with slot j before step j+1 refills it

    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    rows_o = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_ptr = Out + h.to(gl.int64) * stride_oh + rows_o.to(gl.int64)[:, None] * stride_ot + cols_o[None, :]
    gl.store(o_ptr, acc.to(gl.bfloat16))


@gluon.jit
def _ws_producer(K, V, k_ring, v_ring, ready, empty, T, HKV, kvh, n, stride_kt, stride_vt,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """The loader warp: key tile j's K and V by TMA into slot j % STAGES once the consumers freed it."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # [T, Hkv * D] views of k / v ([T, Hkv, D] in memory): tile (j, kvh) at (j * BLOCK_N, kvh * D)
    k_desc = tma.make_tensor_descriptor(K, [T, HKV * HEAD_DIM], [stride_kt, 1], [BLOCK_N, HEAD_DIM], smem)
    v_desc = tma.make_tensor_descriptor(V, [T, HKV * HEAD_DIM], [stride_vt, 1], [BLOCK_N, HEAD_DIM], smem)
    for j in range(n):
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)  # the first pass through the ring: free
        mbarrier.expect(ready.index(slot), 2 * BLOCK_N * HEAD_DIM * 2)
        tma.async_copy_global_to_shared(k_desc, [j * BLOCK_N, kvh * HEAD_DIM], ready.index(slot), k_ring.index(slot))
        tma.async_copy_global_to_shared(v_desc, [j * BLOCK_N, kvh * HEAD_DIM], ready.index(slot), v_ring.index(slot))


@gluon.jit
def _ws_consumer(q_smem, k_ring, v_ring, ready, empty, n, n_full, start_m, qk_scale, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """The two math warpgroups: scores of tile j+1 issued before the softmax of tile j (as ``LOOKAHEAD``);
    a slot is handed back to the loader once the wgmmas reading it are waited."""
    WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False)
    for j in range(0, n):
        slot = j % STAGES
        nxt = (j + 1) % STAGES
        has_next = j + 1 < n
        mbarrier.wait(ready.index(nxt), ((j + 1) // STAGES) & 1, pred=has_next)
        s_next = warpgroup_mma(q_smem, k_ring.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        x = s * qk_scale
        if j >= n_full:
            keep = (j * BLOCK_N + cols_s)[None, :] <= rows_s[:, None]
            x = gl.where(keep, x, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(x, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)
        s_next, acc = warpgroup_mma_wait(0, deps=[s_next, acc])
        s = s_next
        mbarrier.arrive(empty.index(slot))
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    return (acc,)  # warp_specialize takes the default partition's results as a tuple


@gluon.jit
def _fa_fwd_ws(
    Q, K, V, Out, qk_scale,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_vh, stride_vt, stride_oh, stride_ot,
    T, HQ, HKV, n_tiles,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Warp-specialised: one loader warp (TMA, mbarriers), the kernel's warps do the math."""
    WARPS: gl.constexpr = gl.num_warps()
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [WARPS, 1], [1, 0])
    pid = gl.program_id(0)
    h = pid % HQ
    tile = n_tiles - 1 - pid // HQ
    start_m = tile * BLOCK_M
    kvh = h // (HQ // HKV)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, HEAD_DIM], smem)
    k_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], smem)
    v_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], smem)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    q_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    d_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    Q0 = Q + h.to(gl.int64) * stride_qh
    async_copy.async_copy_global_to_shared(q_smem, Q0 + q_rows.to(gl.int64)[:, None] * stride_qt + d_cols[None, :])
    async_copy.commit_group()
    async_copy.wait_group(0)
    gl.thread_barrier()
    fence_async_shared()
    n_full = start_m // BLOCK_N
    n = (start_m + BLOCK_M) // BLOCK_N
    (acc,) = gl.warp_specialize(
        [
            (
                _ws_consumer,
                (
                    q_smem,
                    k_ring,
                    v_ring,
                    ready,
                    empty,
                    n,
                    n_full,
                    start_m,
                    qk_scale,
                    BLOCK_M,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                ),
            ),  # fmt: skip
            (
                _ws_producer,
                (K, V, k_ring, v_ring, ready, empty, T, HKV, kvh, n, stride_kt, stride_vt, BLOCK_N, HEAD_DIM, STAGES),
            ),  # fmt: skip
        ],
        [1],
        [24],
    )
    rows_o = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_ptr = Out + h.to(gl.int64) * stride_oh + rows_o.to(gl.int64)[:, None] * stride_ot + cols_o[None, :]
    gl.store(o_ptr, acc.to(gl.bfloat16))


def fa_fwd_ws(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stages: int = 3, block_n: int = BLOCK_N, two: bool = False,
    lookahead: bool = True, pingpong: bool = False,
):  # fmt: skip
    """:func:`fa_fwd` with :func:`_fa_fwd_ws` (``two``: :func:`_fa_fwd_ws2` with ``lookahead`` / ``pingpong``);
    k / v must be [1, Hkv, T, D] views of [T, Hkv, D] memory."""
    _, hq, t, d = q.shape
    assert k.stride(2) == k.shape[1] * d and v.stride(2) == v.shape[1] * d and k.stride(1) == d
    out = torch.empty_like(q)
    n_tiles = t // BLOCK_M
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    kernel, warps = (_fa_fwd_ws2, 4) if two else (_fa_fwd_ws, WARPS)
    extra = dict(LOOKAHEAD=lookahead, PINGPONG=pingpong) if two else {}
    kernel[(hq * n_tiles,)](
        q, k, v, out, d**-0.5 * 1.4426950408889634,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), out.stride(1), out.stride(2),
        t, hq, k.shape[1], n_tiles,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, HEAD_DIM=HEAD_DIM, STAGES=stages, num_warps=warps, **extra,
    )  # fmt: skip
    return out


@gluon.jit
def _ws2_consumer(q_smem, k_ring, v_ring, ready, empty, turn, n, row0, qk_scale, Out, stride_ot,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, LOOKAHEAD: gl.constexpr,
                  PINGPONG: gl.constexpr):  # fmt: skip
    """One math warpgroup (``me`` 0 or 1, from ``row0``) of :func:`_fa_fwd_ws2`: the 64 rows ``row0 ...`` (its
    slice of the Q tile) against every key tile of the program, its own output store; it frees each slot with one
    arrive (the slot's ``empty`` barrier counts both warpgroups). ``LOOKAHEAD``: tile j+1's scores issued before
    tile j's softmax. ``PINGPONG``: the two warpgroups take turns issuing their wgmmas (``turn[me]`` waited before, the
    other's arrived after), so that one's softmax runs while the other's products do."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    cols_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([64], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([64], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)
    n_full = row0 // BLOCK_N
    me = (row0 // 64) % 2  # a tensor (a literal passed through warp_specialize's arguments becomes a constexpr)
    if LOOKAHEAD:
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False)
    for j in range(0, n):
        slot = j % STAGES
        if PINGPONG:
            mbarrier.wait(turn.index(me), (j & 1) ^ (me ^ 1))
        if LOOKAHEAD:
            nxt = (j + 1) % STAGES
            mbarrier.wait(ready.index(nxt), ((j + 1) // STAGES) & 1, pred=j + 1 < n)
            s_next = warpgroup_mma(q_smem, k_ring.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        else:
            mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False)
        x = s * qk_scale
        if j >= n_full:
            keep = (j * BLOCK_N + cols_s)[None, :] <= rows_s[:, None]
            x = gl.where(keep, x, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(x, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - me))
        if LOOKAHEAD:
            s_next, acc = warpgroup_mma_wait(0, deps=[s_next, acc])
            s = s_next
        else:
            acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index(slot))
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    rows_o = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(Out + rows_o.to(gl.int64)[:, None] * stride_ot + cols_o[None, :], acc.to(gl.bfloat16))


@gluon.jit
def _fa_fwd_ws2(
    Q, K, V, Out, qk_scale,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_vh, stride_vt, stride_oh, stride_ot,
    T, HQ, HKV, n_tiles,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
    LOOKAHEAD: gl.constexpr, PINGPONG: gl.constexpr,
):  # fmt: skip
    """Warp-specialised with two independent math warpgroups (64 rows each, 4 + 4 warps) and a TMA loader warp:
    the warpgroups drift apart, so one's softmax can run under the other's wgmmas (FA3's ping-pong, here left to
    the warp schedulers instead of named barriers). Launched with 4 warps (the first warpgroup)."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    pid = gl.program_id(0)
    h = pid % HQ
    tile = n_tiles - 1 - pid // HQ
    start_m = tile * BLOCK_M
    kvh = h // (HQ // HKV)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, HEAD_DIM], smem)
    k_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], smem)
    v_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], smem)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    q_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    d_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    Q0 = Q + h.to(gl.int64) * stride_qh
    async_copy.async_copy_global_to_shared(q_smem, Q0 + q_rows.to(gl.int64)[:, None] * stride_qt + d_cols[None, :])
    async_copy.commit_group()
    async_copy.wait_group(0)
    gl.thread_barrier()
    fence_async_shared()
    n = (start_m + BLOCK_M) // BLOCK_N
    O0 = Out + h.to(gl.int64) * stride_oh
    # the partitions' argument tuples inline: a tuple assigned to a name first turns its constexprs into tensors
    gl.warp_specialize(
        [(_ws2_consumer, (q_smem.slice(0, 64), k_ring, v_ring, ready, empty, turn, n, start_m, qk_scale, O0,
                          stride_ot, BLOCK_N, HEAD_DIM, STAGES, LOOKAHEAD, PINGPONG)),
         (_ws2_consumer, (q_smem.slice(64, 64), k_ring, v_ring, ready, empty, turn, n, start_m + 64, qk_scale, O0,
                          stride_ot, BLOCK_N, HEAD_DIM, STAGES, LOOKAHEAD, PINGPONG)),
         (_ws_producer, (K, V, k_ring, v_ring, ready, empty, T, HKV, kvh, n, stride_kt, stride_vt, BLOCK_N, HEAD_DIM,
                         STAGES))],
        [4, 1], [232, 24],
    )  # fmt: skip


# ---------------------------------------------------------------- block-sparse, per-group masks, 64-token blocks
@gluon.jit
def _sp_loader(K, V, k_ring, v_ring, ready, empty, T, HKV, kvh, blocks, cnt, stride_kt, stride_vt,
               BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """The loader warp of :func:`_sp_fwd_ws2`: the kept key blocks ``blocks[0 .. cnt)`` (block = key tile) by TMA."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    k_desc = tma.make_tensor_descriptor(K, [T, HKV * HEAD_DIM], [stride_kt, 1], [BLOCK_N, HEAD_DIM], smem)
    v_desc = tma.make_tensor_descriptor(V, [T, HKV * HEAD_DIM], [stride_vt, 1], [BLOCK_N, HEAD_DIM], smem)
    for j in range(cnt):
        blk = gl.load(blocks + j)
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), 2 * BLOCK_N * HEAD_DIM * 2)
        tma.async_copy_global_to_shared(k_desc, [blk * BLOCK_N, kvh * HEAD_DIM], ready.index(slot), k_ring.index(slot))
        tma.async_copy_global_to_shared(v_desc, [blk * BLOCK_N, kvh * HEAD_DIM], ready.index(slot), v_ring.index(slot))


@gluon.jit
def _sp_math(q_smem, k_ring, v_ring, ready, empty, blocks, cnt, qblk, pos0, head0, qk_scale, Out, stride_oh,
             stride_ot, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """A math warpgroup of :func:`_sp_fwd_ws2`: 64 rows = 2 query heads (``head0``, ``head0 + 1``) x 32 positions
    ``pos0 ...``; entries from the diagonal block ``qblk`` on are masked causally."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    pos_s = pos0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout)) % 32
    cols_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([64], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([64], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)
    for j in range(0, cnt):
        slot = j % STAGES
        blk = gl.load(blocks + j)
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False)
        x = s * qk_scale
        if blk >= qblk:
            keep = (blk * BLOCK_N + cols_s)[None, :] <= pos_s[:, None]
            x = gl.where(keep, x, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(x, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p16 = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index(slot))
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    r = gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    row_off = (head0 + r // 32).to(gl.int64) * stride_oh + (pos0 + r % 32).to(gl.int64) * stride_ot
    gl.store(Out + row_off[:, None] + cols_o[None, :], acc.to(gl.bfloat16))


@gluon.jit
def _sp_fwd_ws2(
    Q, K, V, Out, LNum, LIdx, qk_scale,
    stride_qh, stride_qt, stride_kt, stride_vt, stride_oh, stride_ot, stride_nh, stride_ih, stride_iq,
    T, HQ, HKV, NQ,
    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Block-sparse forward, per-group masks (one list per KV head and 64-token query block), 4 query heads a group,
    64-token blocks, T a multiple of 64: a program owns 32 positions of one query block for the group's 4 heads
    (128 rows; each math warpgroup two heads), walks the block's list (the loader warp reads it), as our Triton
    kernel's M128/P4 tile. Program order: KV head slowest, heaviest query blocks first."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    pid = gl.program_id(0)
    per = NQ * 2
    kvh = pid // per
    t = per - 1 - pid % per
    qblk = t // 2
    pos0 = qblk * 64 + (t % 2) * 32
    head0 = kvh * 4
    blocks = LIdx + kvh.to(gl.int64) * stride_ih + qblk.to(gl.int64) * stride_iq
    cnt = gl.load(LNum + kvh * stride_nh + qblk)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [128, HEAD_DIM], smem)
    k_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], smem)
    v_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], smem)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    r = gl.arange(0, 128, layout=gl.SliceLayout(1, ld))
    d_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    q_off = (head0 + r // 32).to(gl.int64) * stride_qh + (pos0 + r % 32).to(gl.int64) * stride_qt
    async_copy.async_copy_global_to_shared(q_smem, Q + q_off[:, None] + d_cols[None, :])
    async_copy.commit_group()
    async_copy.wait_group(0)
    gl.thread_barrier()
    fence_async_shared()
    gl.warp_specialize(
        [(_sp_math, (q_smem.slice(0, 64), k_ring, v_ring, ready, empty, blocks, cnt, qblk, pos0, head0, qk_scale,
                     Out, stride_oh, stride_ot, BLOCK_N, HEAD_DIM, STAGES)),
         (_sp_math, (q_smem.slice(64, 64), k_ring, v_ring, ready, empty, blocks, cnt, qblk, pos0, head0 + 2,
                     qk_scale, Out, stride_oh, stride_ot, BLOCK_N, HEAD_DIM, STAGES)),
         (_sp_loader, (K, V, k_ring, v_ring, ready, empty, T, HKV, kvh, blocks, cnt, stride_kt, stride_vt, BLOCK_N,
                       HEAD_DIM, STAGES))],
        [4, 1], [232, 24],
    )  # fmt: skip


def sparse_fwd_ws2(q, k, v, kv_num_blocks, kv_indices, stages: int = 4):
    """q [1, Hq, T, D], k/v [1, Hkv, T, D] views of [T, H, D] memory, bf16, D 128, Hq = 4 Hkv, T % 64 == 0; per-group
    mask lists of 64-token blocks (kv_num_blocks [1, Hkv, NQ], kv_indices [1, Hkv, NQ, NK], ascending, diagonal kept)
    -> out [1, Hq, T, D] ([T, Hq, D] memory)."""
    _, hq, t, d = q.shape
    hkv = k.shape[1]
    assert hq == 4 * hkv and d == HEAD_DIM and t % 64 == 0 and k.stride(2) == hkv * d and v.stride(2) == hkv * d
    nq = t // 64
    out = torch.empty(1, t, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _sp_fwd_ws2[(hkv * nq * 2,)](
        q, k, v, out, kv_num_blocks, kv_indices, d**-0.5 * 1.4426950408889634,
        q.stride(1), q.stride(2), k.stride(2), v.stride(2), out.stride(1), out.stride(2),
        kv_num_blocks.stride(1), kv_indices.stride(1), kv_indices.stride(2),
        t, hq, hkv, nq, BLOCK_N=64, HEAD_DIM=HEAD_DIM, STAGES=stages, num_warps=4,
    )  # fmt: skip
    return out


def sparse_run(mode: str, t: int, densities: list[float]) -> None:
    """Per-group masks (the benchmark's structured density masks), 32 / 8 heads, D 128, block 64: ``check`` the
    Gluon kernel against seerattn's Triton kernel (and the fp32 reference at small T), ``bench`` both, FlexAttention
    and FA4 (where installed) on the same mask in one process."""
    import functools

    from triton.testing import do_bench

    from benchmarks.attention import synthetic_mask
    from seerattn.ops import fa4 as fa4_mod
    from seerattn.ops import reference
    from seerattn.ops._triton import sparse_fwd as spk
    from seerattn.ops.flex import flex_attention_call, to_flex_block_mask

    hq, hkv, d, bs = 32, 8, 128, 64
    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(1, t, hq, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(1, t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    scale = d**-0.5
    for density in densities:
        mask = synthetic_mask(hkv, t, bs, density, "structured", seed=t + bs)
        num, idx = mask.kv_num_blocks, mask.kv_indices
        ours = functools.partial(spk.block_sparse_attention_fwd, q, k, v, num, idx, bs, scale, None, False, None,
                                 mask_source=mask.source, mask_memo=mask.memo)  # fmt: skip
        gluon_fn = functools.partial(sparse_fwd_ws2, q, k, v, num, idx)
        tag = f"T={t} sparse per-group block 64 density={density}"
        if mode == "check":
            o_ours = ours()[0].float()
            o_gl = gluon_fn().float()
            line = f"{tag} rel_vs_triton={((o_gl - o_ours).norm() / o_ours.norm()).item():.2e}"
            if t <= 8192:
                ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask)
                line += f" gluon_vs_fp32={((o_gl - ref).norm() / ref.norm()).item():.2e}"
                line += f" triton_vs_fp32={((o_ours - ref).norm() / ref.norm()).item():.2e}"
            print(line, flush=True)
            continue
        rows = [("gluon-ws2", gluon_fn), ("seerattn-triton", ours)]
        fm = to_flex_block_mask(mask, hq)
        rows.append(("flex", functools.partial(flex_attention_call, q, k, v, fm, scale, False)))
        if fa4_mod.installed():
            rows.append(("fa4", functools.partial(flex_attention_call, q, k, v, fm, scale, False, "FLASH")))
        for name, fn in rows:
            ms = do_bench(fn, rep=100)
            print(f"{tag} {name} ms={ms:.3f}", flush=True)


def fa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stages: int = 3, lookahead: bool = True, block_n: int = BLOCK_N
):
    """q [1, Hq, T, D], k/v [1, Hkv, T, D] bf16 (unit last stride), T % 128 == 0, D 128 -> out [1, Hq, T, D]."""
    _, hq, t, d = q.shape
    assert q.shape[0] == 1 and d == HEAD_DIM and t % BLOCK_M == 0 and q.dtype == torch.bfloat16
    out = torch.empty_like(q)
    n_tiles = t // BLOCK_M
    _fa_fwd[(hq * n_tiles,)](
        q, k, v, out, d**-0.5 * 1.4426950408889634,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), out.stride(1), out.stride(2),
        t, hq, hq // k.shape[1], n_tiles,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, HEAD_DIM=HEAD_DIM, STAGES=stages, LOOKAHEAD=lookahead, num_warps=WARPS,
    )  # fmt: skip
    return out


# name -> (kernel kind, key step, stages, look-ahead, ping-pong); kind "plain" (8 warps, cp.async ring), "ws" (plus a
# TMA loader warp), "ws2" (two independent 4-warp math warpgroups and a loader warp)
RUNS = {
    "plain-n64-s3": ("plain", 64, 3, False, False),
    "plain-n128-s2": ("plain", 128, 2, False, False),
    "plain-n64-s4-look": ("plain", 64, 4, True, False),
    "ws-n64-s4": ("ws", 64, 4, True, False),
    "ws2-n64-s4-look": ("ws2", 64, 4, True, False),
    "ws2-n64-s4": ("ws2", 64, 4, False, False),
    "ws2-n64-s4-look-pp": ("ws2", 64, 4, True, True),
    "ws2-n64-s4-pp": ("ws2", 64, 4, False, True),
    "ws2-n64-s5-look": ("ws2", 64, 5, True, False),
    "ws2-n64-s5-look-pp": ("ws2", 64, 5, True, True),
}


def launcher(name: str):
    """``fn(q, k, v) -> out`` of run ``name``."""
    import functools

    kind, block_n, stages, look, pp = RUNS[name]
    if kind == "plain":
        return lambda q, k, v: fa_fwd(q, k, v, stages, look, block_n)
    return functools.partial(_ws_launch, stages=stages, block_n=block_n, two=kind == "ws2", lookahead=look,
                             pingpong=pp)  # fmt: skip


def _ws_launch(q, k, v, **kw):
    return fa_fwd_ws(q, k, v, **kw)


def _compile(fn, consts: dict, pointers: dict, warps: int) -> dict:
    """``fn`` compiled for sm_90 without a GPU by ``benchmarks.sm90.compile_sm90`` (Gluon-aware), strides and T
    declared 16-divisible as a launch specialises them, the other integers free."""
    from benchmarks.sm90 import compile_sm90

    free = [n for n in fn.arg_names if n not in consts and n not in pointers and n != "qk_scale"
            and not (n.startswith("stride") or n == "T")]  # fmt: skip
    return compile_sm90(fn, consts, pointers, tuple(free), warps, floats=("qk_scale",))


def compile_offline(name: str) -> dict:
    """Run ``name``'s kernel compiled for sm_90 without a GPU (ptxas's registers / spills, shared memory)."""
    kind, block_n, stages, look, pp = RUNS[name]
    fn = {"plain": _fa_fwd, "ws": _fa_fwd_ws, "ws2": _fa_fwd_ws2}[kind]
    consts = dict(BLOCK_M=BLOCK_M, BLOCK_N=block_n, HEAD_DIM=HEAD_DIM, STAGES=stages)
    if kind == "plain":
        consts["LOOKAHEAD"] = look
    if kind == "ws2":
        consts.update(LOOKAHEAD=look, PINGPONG=pp)
    pointers = dict.fromkeys(("Q", "K", "V", "Out"), "bf16")
    return {"run": name, **_compile(fn, consts, pointers, 4 if kind == "ws2" else WARPS)}


def run_shape(mode: str, t: int, runs: list[str]) -> None:
    """``check``: each variant's error against SDPA's flash kernel; ``bench``: each variant's time, then SDPA's
    FA2 and cuDNN backends and seerattn's Triton dense forward on the same inputs."""
    import functools

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from seerattn.ops._triton.block_scores import attention_with_block_scores_fwd

    hq, hkv, d = 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(1, t, hq, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(1, t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    flops = 4 * d * hq * t * (t + 1) / 2
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
    ref = None
    if mode == "check":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            ref = sdpa().float()
    # the warp-specialised ones last: a deadlock there (an mbarrier phase wrong) leaves the others' lines printed
    for name in runs:
        run = functools.partial(launcher(name), q, k, v)
        line = f"T={t} gluon {name}"
        if ref is not None:
            out = run().float()
            line += f" rel_err_vs_sdpa_flash={((out - ref).norm() / ref.norm()).item():.2e}"
        else:
            ms = do_bench(run, rep=100)
            line += f" ms={ms:.3f} tflops={flops / ms / 1e9:.0f}"
        print(line, flush=True)
    if mode == "bench":
        for name, backend in (("sdpa-fa2", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel([backend]):
                ms = do_bench(sdpa, rep=100)
            print(f"T={t} {name} ms={ms:.3f} tflops={flops / ms / 1e9:.0f}", flush=True)
        ours = functools.partial(attention_with_block_scores_fwd, q, k, v, 64, d**-0.5, store_scores=False)
        ms = do_bench(ours, rep=100)
        print(f"T={t} seerattn-triton-dense ms={ms:.3f} tflops={flops / ms / 1e9:.0f}", flush=True)


def main(argv: list[str]) -> None:
    mode = argv[0] if argv else "compile"
    if mode in ("sparse-check", "sparse-bench"):
        t = int(argv[1]) if len(argv) > 1 else 32768
        sparse_run(mode.split("-")[1], t, [float(x) for x in (argv[2] if len(argv) > 2 else "0.1,0.05,1.0").split(",")])
        return
    runs = argv[1].split(",") if len(argv) > 1 else list(RUNS)
    if mode == "compile":
        for name in runs:
            print(compile_offline(name), flush=True)
        print(compile_sparse(), flush=True)
        return
    seqlens = [int(x) for x in argv[2].split(",")] if len(argv) > 2 else ([4096, 32768] if mode == "check" else [32768])
    for t in seqlens:
        run_shape(mode, t, runs)


def compile_sparse(stages: int = 4) -> dict:
    """:func:`_sp_fwd_ws2` compiled for sm_90 without a GPU."""
    pointers = dict.fromkeys(("Q", "K", "V", "Out"), "bf16") | dict.fromkeys(("LNum", "LIdx"), "i32")
    consts = dict(BLOCK_N=64, HEAD_DIM=HEAD_DIM, STAGES=stages)
    return {"run": f"sparse-ws2-s{stages}", **_compile(_sp_fwd_ws2, consts, pointers, 4)}


if __name__ == "__main__":
    main(sys.argv[1:])
