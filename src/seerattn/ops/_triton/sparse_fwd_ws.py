"""Block-sparse causal forward for Hopper in Gluon: warp-specialised tiles for 64-token mask blocks (per-group or
per-query-head masks) and 128-token ones (per group).

Algorithm
---------
The same attention as :mod:`.sparse_fwd` (online softmax in the log2 domain over the kept key blocks of a mask
row, the diagonal block masked causally), scheduled by hand with Gluon (``triton.experimental.gluon``: mbarriers,
TMA, async wgmma and ``warp_specialize``, which the compiler-scheduled Triton kernels cannot use on Hopper):

- per-group masks (:func:`_sparse_fwd_ws_kernel`): a program owns 128 query rows, ``P = 128 / G`` consecutive
  positions of one query block for the ``G`` query heads of one KV group (they share the block's list and every
  K/V tile);
- a **loader warp** walks the list (``kv_indices[b, g, I, :kv_num_blocks[b, g, I]]``) and copies the kept blocks'
  K and V tiles by TMA into a ring of slots in shared memory (an mbarrier ``ready`` per slot, signalled by the
  copies' bytes; an mbarrier ``empty`` per slot, which both math warpgroups arrive on when done with it). A slot
  holds a step's keys (``BLOCK_N``): 64 (one kept 64-token block; ``STAGES`` slots) or 128 (``STAGES_PAIR``
  slots: two kept 64-token blocks, list entries ``2j`` and ``2j + 1`` in the slot's two halves, or one 128-token
  block), so that a step's scores are one ``N = 128`` wgmma and the online softmax's per-step work (row max,
  rescaling the output accumulator) is spread over twice the keys;
- **two math warpgroups** (4 warps each) own 64 of the rows each and run independently: scores ``S = Q K^T``
  (wgmma from shared memory), the online softmax in registers, ``O += P V`` (P from registers); one's softmax runs
  while the other's products do (FlashAttention-3's ping-pong, left to the warp schedulers; explicit turn-taking
  through mbarriers measured 15 % slower). Blocks from the diagonal on are masked causally; rows with an empty list
  give zeros and lse ``-inf``;
- per-query-head masks (:func:`_sparse_fwd_ws_heads_kernel`): a program owns one query block of two query heads,
  each math warpgroup one head with its own list, ring and barriers (``STAGES_HEADS`` slots each), and the loader
  warp fills both rings step by step alternately.

Measured against the Triton kernel's tiles, FlexAttention and FlashAttention-4 on the same masks (H200, 32k, 32 / 8
heads, D 128, bf16, 10 %; docs/experiments/kernel-speed/session18, calls 6-7): per group 2.000 ms (the Triton tiles'
best 2.171, FA4 2.180); per query head 2.157 / 2.040 on structured / random masks (the Triton 64-row tile 2.393 /
2.415, FA4 2.107 / 2.230). 128-key steps (docs/experiments/kernel-speed/session19): all blocks kept 564-568 TFLOP/s
(FA4 667), block 64 / 10 % 1.88-1.97 ms, 1.20x FA4 at 128k; at 128-token blocks FA4 stays ahead (1.404 ms against
1.86-1.92 at 10 %). It is a tuning candidate (:func:`.config.sparse_configs`, ``hopper_ws``): the tuner keeps it
where it is faster.

Layouts: q ``[B, Hq, T, D]``, k / v ``[B, Hkv, T, D]``, any strides with a unit last stride and batch, head and token
strides that TMA accepts (16-byte multiples); out ``[B, Hq, T, D]`` shaped, ``[B, T, Hq, D]`` in memory (as
:mod:`.sparse_fwd`); lse ``[B, Hq, T]`` fp32 natural log. Lists int32 ``[B, H, NQ(, NK)]``, H = Hkv or Hq.

Supported (:func:`supported` says why not): an sm_90 GPU, fp16 / bf16, D 64 or 128, per-group masks with ``G`` in
(2, 4, 8) query heads a group at 64- or 128-token blocks, per-query-head masks with an even head count at 64-token
blocks (two rings of 128-key slots would not fit in shared memory), no varlen. Limitations: forward only; Gluon has
no interpreter, so the CPU tests compile it for sm_90 (``benchmarks/sm90.py``) and only the GPU tests run it. The
K / V descriptors are built on the device (one pair per program), which needs Triton's global-scratch allocator:
:func:`launch` sets one for its launch only (in a copied context, the caller's allocator untouched).
"""

from __future__ import annotations

import contextvars

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

from .common import LN2, LOG2E

__all__ = [
    "GROUPS", "HEAD_DIMS", "MASK_BLOCKS", "STAGES", "STAGES_HEADS", "STAGES_PAIR", "STEPS", "launch", "stages",
    "supported",
]  # fmt: skip

MASK_BLOCKS = (64, 128)
GROUPS = (2, 4, 8)
HEAD_DIMS = (64, 128)
# K / V slots in shared memory: Q 32 KiB + 4 x 32 KiB at D 128 (the prototype's 4 beat 3 and matched 5); per-query-head
# masks hold two rings (one a warpgroup) of STAGES_HEADS slots each: 32 + 2 x 3 x 32 = 224 KiB at D 128
STAGES = 4
STAGES_HEADS = 3
# (mask block, keys a step) of the per-group kernel: a 64-token block a step, two of them a step (128-key slots, one
# wgmma N = 128 for the scores), or a 128-token block a step; per-query-head masks: 64-token blocks, 64-key steps
STEPS = ((64, 64), (64, 128), (128, 128))
# 128-key slots at D 128: Q 32 KiB + STAGES_PAIR x 64 KiB
STAGES_PAIR = 3


def stages(block_n: int) -> int:
    """The per-group kernel's ring depth: ``STAGES`` 64-key or ``STAGES_PAIR`` 128-key slots."""
    return STAGES if block_n == 64 else STAGES_PAIR


def supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_block: int, mask_heads: int, varlen: bool
) -> str | None:
    """None when :func:`launch` can run this case, else why not."""
    # ROCm reports its GPUs as "cuda" devices, some with a major capability of 9: not Hopper
    if q.device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "needs an sm_90 (Hopper) GPU"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"takes fp16 / bf16, got {q.dtype}"
    hq, d, hkv = q.shape[1], q.shape[3], k.shape[1]
    if d not in HEAD_DIMS:
        return f"takes head dims {HEAD_DIMS}, got {d}"
    if mask_block not in MASK_BLOCKS:
        return f"takes {MASK_BLOCKS}-token mask blocks, got {mask_block}"
    if mask_heads == hq:
        if mask_block != 64:
            return f"takes per-query-head masks at 64-token blocks only, got {mask_block}"
        if hq % 2:
            return f"pairs query heads for per-query-head masks: needs an even head count, got {hq}"
    elif mask_heads != hkv or hq // hkv not in GROUPS:
        return (
            f"takes per-query-head masks, or per-group masks with {GROUPS} query heads a group; got {mask_heads} mask "
            f"heads for {hq} / {hkv}"
        )
    if varlen:
        return "has no varlen path"
    for name, x in (("k", k), ("v", v)):
        if any((stride * x.element_size()) % 16 for stride in x.stride()[:3]):
            return f"needs {name}'s batch, head and token strides in 16-byte multiples (TMA), got {x.stride()}"
    return None


@gluon.jit
def _descriptors(K, V, T, stride_kt, stride_vt, HEAD_DIM: gl.constexpr):
    """TMA descriptors of one KV head's K and V (``[T, D]`` from the head's base, 64-token tiles)."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    k_desc = tma.make_tensor_descriptor(K, [T, HEAD_DIM], [stride_kt, 1], [64, HEAD_DIM], smem)
    v_desc = tma.make_tensor_descriptor(V, [T, HEAD_DIM], [stride_vt, 1], [64, HEAD_DIM], smem)
    return k_desc, v_desc


@gluon.jit
def _num_steps(cnt, MB: gl.constexpr, BLOCK_N: gl.constexpr):
    """Steps over a list of ``cnt`` kept blocks: one a step, or two 64-token blocks a 128-key step."""
    if MB == 64 and BLOCK_N == 128:
        return (cnt + 1) // 2
    else:
        return cnt


@gluon.jit
def _step_blocks(blocks, cnt, j, MB: gl.constexpr, BLOCK_N: gl.constexpr):
    """Step ``j``'s key tiles in 64-token units: (the first, the second; equal with 64-key steps). A 128-token block
    is its two halves; with 64-token blocks and 128-key steps, list entries ``2j`` and ``2j + 1``, and an odd list's
    last step repeats its block (finite values the math masks off: an unwritten half could hold NaN bits, and
    ``0 * NaN`` in ``P V`` is NaN)."""
    if MB == 128:
        first = gl.load(blocks + j) * 2
        second = first + 1
    elif BLOCK_N == 64:
        first = gl.load(blocks + j)
        second = first
    else:
        first = gl.load(blocks + 2 * j)
        second = gl.load(blocks + gl.minimum(2 * j + 1, cnt - 1))
    return first, second


@gluon.jit
def _copy_step(k_desc, v_desc, k_ring, v_ring, ready, empty, blocks, cnt, j,
               STAGES: gl.constexpr, MB: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """Step ``j``'s K and V tiles by TMA into slot ``j % STAGES`` (a 128-key slot: its two 64-row halves) once the
    math warpgroups freed it (a fresh ``empty`` barrier passes its first wait: parity 1 of the phase before);
    ``ready`` counts the bytes."""
    first, second = _step_blocks(blocks, cnt, j, MB, BLOCK_N)
    slot = j % STAGES
    mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(slot), (BLOCK_N // 32) * k_desc.block_type.nbytes)
    k_slot = k_ring.index(slot)
    v_slot = v_ring.index(slot)
    if BLOCK_N == 64:
        tma.async_copy_global_to_shared(k_desc, [first * 64, 0], ready.index(slot), k_slot)
        tma.async_copy_global_to_shared(v_desc, [first * 64, 0], ready.index(slot), v_slot)
    else:
        tma.async_copy_global_to_shared(k_desc, [first * 64, 0], ready.index(slot), k_slot.slice(0, 64))
        tma.async_copy_global_to_shared(k_desc, [second * 64, 0], ready.index(slot), k_slot.slice(64, 64))
        tma.async_copy_global_to_shared(v_desc, [first * 64, 0], ready.index(slot), v_slot.slice(0, 64))
        tma.async_copy_global_to_shared(v_desc, [second * 64, 0], ready.index(slot), v_slot.slice(64, 64))


@gluon.jit
def _loader(K, V, k_ring, v_ring, ready, empty, blocks, cnt, T, stride_kt, stride_vt,
            HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, MB: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """The loader warp of the per-group kernel: the list ``blocks[0 .. cnt)`` into the ring, step by step."""
    k_desc, v_desc = _descriptors(K, V, T, stride_kt, stride_vt, HEAD_DIM)
    for j in range(_num_steps(cnt, MB, BLOCK_N)):
        _copy_step(k_desc, v_desc, k_ring, v_ring, ready, empty, blocks, cnt, j, STAGES, MB, BLOCK_N)


@gluon.jit
def _softmax_step(s, m_i, l_i, j, blocks, cnt, qb, pos_s, cols_s, qk_scale, MB: gl.constexpr, BLOCK_N: gl.constexpr):
    """Step ``j``'s online softmax on its raw scores ``s`` [64, BLOCK_N]: the causal mask on the diagonal, the new
    running max and sum; returns (``p``: the step's probabilities relative to the new max, ``alpha``: the factor that
    rescales what was accumulated before the step, ``m_i``, ``l_i``)."""
    blk_a, blk_b = _step_blocks(blocks, cnt, j, MB, BLOCK_N)
    if MB == 64 and BLOCK_N == 128:
        if 2 * j + 1 >= cnt:  # an odd list's last step: its repeated block masked off as if past the diagonal
            blk_b = qb + 1
    if gl.maximum(blk_a, blk_b) >= qb:  # the diagonal block (policies keep nothing above it): causal
        if BLOCK_N == 64:
            key = blk_a * 64 + cols_s
        else:
            key = gl.where(cols_s < 64, blk_a * 64 + cols_s, blk_b * 64 + cols_s - 64)
        keep = key[None, :] <= pos_s[:, None]
        s = gl.where(keep, s, float("-inf"))
    # the running max in the scaled (log2) domain from the raw scores' max (rounding is monotonic: the same value
    # as the max of the scaled scores), so that each score is scaled and shifted by one fma before its exp2
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    # a row with nothing visible yet keeps m = -inf: subtract 0 (exp2(-inf) = 0, never NaN)
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_sub)
    p = gl.exp2(s * qk_scale - m_sub[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _math(q_smem, k_ring, v_ring, ready, empty, blocks, cnt, qb, row0, pos0, head0, T, qk_scale, Out, Lse,
          stride_oh, stride_ot, stride_lh,
          P: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr,
          MB: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """A math warpgroup: rows ``row0 .. row0 + 63`` of the program's 128 (row r = head ``head0 + r // P``, position
    ``pos0 + r % P``; ``qb``: the 64-token block of ``pos0``) against every kept block, a step at a time (``BLOCK_N``
    keys: :func:`_step_blocks`), then its output and lse stores (rows at or past T skipped).

    Software-pipelined as FlashAttention-3 within a warpgroup: step ``j``'s scores ``Q K_j^T`` and step ``j - 1``'s
    ``P V_{j-1}`` are issued together (async wgmma, completed in order), so step ``j``'s softmax runs on the CUDA cores
    while the tensor cores still add ``P V_{j-1}``; the accumulator is rescaled once that product is in. A slot is
    freed after its V product, so a warpgroup holds two slots (K of step j, V of step j - 1)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    pos_s = pos0 + (row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))) % P
    cols_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([64], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([64], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)
    p16 = gl.zeros([64, BLOCK_N], q_smem.dtype, layout=p_layout)
    n = _num_steps(cnt, MB, BLOCK_N)
    if n > 0:  # step 0: scores and softmax only (nothing accumulated yet to rescale)
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, blocks, cnt, qb, pos_s, cols_s, qk_scale, MB, BLOCK_N)
        p16 = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    for j in range(1, n):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p16, v_ring.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s])  # the scores (issued first) are in; P V_{j-1} may still run
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j, blocks, cnt, qb, pos_s, cols_s, qk_scale, MB, BLOCK_N)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index(prev))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p16 = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    if n > 0:  # the last step's P V
        last = (n - 1) % STAGES
        acc = warpgroup_mma(p16, v_ring.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index(last))
    empty_row = l_i == 0.0
    acc = acc / gl.convert_layout(gl.where(empty_row, 1.0, l_i), gl.SliceLayout(1, o_layout))[:, None]
    r_o = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
    pos_o = pos0 + r_o % P
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_off = (head0 + r_o // P).to(gl.int64) * stride_oh + pos_o.to(gl.int64) * stride_ot
    gl.store(Out + o_off[:, None] + cols_o[None, :], acc.to(Out.dtype.element_ty), mask=(pos_o < T)[:, None])
    if STORE_LSE:
        r_s = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
        lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(gl.where(empty_row, 1.0, l_i))) * LN2)
        l_off = (head0 + r_s // P).to(gl.int64) * stride_lh + pos_s
        gl.store(Lse + l_off, lse, mask=pos_s < T)


@gluon.jit
def _sparse_fwd_ws_kernel(
    Q, K, V, Out, Lse, LNum, LIdx, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    T, HKV, NQ,
    G: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr, MB: gl.constexpr,
    BLOCK_N: gl.constexpr,
):  # fmt: skip
    P: gl.constexpr = 128 // G  # positions a program (its rows: G heads x P positions)
    SPLIT: gl.constexpr = MB // P  # programs a query block
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # 16-byte cp.async vectors for Q: a warp covers 256 / D rows of D columns
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])

    # (batch, KV head) slowest, query blocks heaviest first, the block's SPLIT programs fastest (as .sparse_fwd)
    pid = gl.program_id(0)
    per = NQ * SPLIT
    bg = pid // per
    tile = per - 1 - pid % per
    b = bg // HKV
    g = bg % HKV
    qblk = tile // SPLIT
    pos0 = qblk * MB + (tile % SPLIT) * P
    qb = pos0 // 64  # P <= 64 divides 64: the program's positions lie in one 64-token block
    head0 = g * G
    b64 = b.to(gl.int64)
    blocks = LIdx + b64 * stride_ib + g.to(gl.int64) * stride_ih + qblk.to(gl.int64) * stride_iq
    cnt = gl.load(LNum + b64 * stride_nb + g.to(gl.int64) * stride_nh + qblk)

    q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [128, HEAD_DIM], smem)
    k_ring = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], smem)
    v_ring = gl.allocate_shared_memory(V.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], smem)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both math warpgroups free a slot
    r = gl.arange(0, 128, layout=gl.SliceLayout(1, ld))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    pos = pos0 + r % P
    q_off = b64 * stride_qb + (head0 + r // P).to(gl.int64) * stride_qh + pos.to(gl.int64) * stride_qt
    async_copy.async_copy_global_to_shared(q_smem, Q + q_off[:, None] + cols[None, :], mask=(pos < T)[:, None])
    async_copy.commit_group()
    async_copy.wait_group(0)
    gl.thread_barrier()
    fence_async_shared()
    K0 = K + b64 * stride_kb + g.to(gl.int64) * stride_kh
    V0 = V + b64 * stride_vb + g.to(gl.int64) * stride_vh
    O0 = Out + b64 * stride_ob
    L0 = Lse + b64 * stride_lb
    # the partitions' argument tuples inline: a tuple bound to a name first turns its constexprs into tensors
    gl.warp_specialize(
        [(_math, (q_smem.slice(0, 64), k_ring, v_ring, ready, empty, blocks, cnt, qb, 0, pos0, head0, T, qk_scale,
                  O0, L0, stride_oh, stride_ot, stride_lh, P, HEAD_DIM, STAGES, STORE_LSE, MB, BLOCK_N)),
         (_math, (q_smem.slice(64, 64), k_ring, v_ring, ready, empty, blocks, cnt, qb, 64, pos0, head0, T,
                  qk_scale, O0, L0, stride_oh, stride_ot, stride_lh, P, HEAD_DIM, STAGES, STORE_LSE, MB, BLOCK_N)),
         (_loader, (K0, V0, k_ring, v_ring, ready, empty, blocks, cnt, T, stride_kt, stride_vt, HEAD_DIM, STAGES,
                    MB, BLOCK_N))],
        [4, 1], [232, 24],
    )  # fmt: skip


@gluon.jit
def _loader_pair(K0, V0, K1, V1, ring0, ring1, ready0, ready1, empty0, empty1, blocks0, blocks1, cnt0, cnt1, T,
                 stride_kt, stride_vt, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """The loader warp of the per-query-head kernel: two lists (one a math warpgroup), each into its own ring
    (``ring0`` / ``ring1`` = (K slots, V slots)), step by step alternately, so neither warpgroup waits for the other's
    list to be loaded first."""
    k0, v0 = _descriptors(K0, V0, T, stride_kt, stride_vt, HEAD_DIM)
    k1, v1 = _descriptors(K1, V1, T, stride_kt, stride_vt, HEAD_DIM)
    for j in range(gl.maximum(cnt0, cnt1)):
        if j < cnt0:
            _copy_step(k0, v0, ring0[0], ring0[1], ready0, empty0, blocks0, cnt0, j, STAGES, 64, 64)
        if j < cnt1:
            _copy_step(k1, v1, ring1[0], ring1[1], ready1, empty1, blocks1, cnt1, j, STAGES, 64, 64)


@gluon.jit
def _sparse_fwd_ws_heads_kernel(
    Q, K, V, Out, Lse, LNum, LIdx, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    T, HQ, NQ, GROUP,
    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr,
):  # fmt: skip
    """Per-query-head masks: a program owns one 64-token query block of two query heads (``2p``, ``2p + 1``), each
    math warpgroup one head with its own list, K / V ring and barriers; one loader warp fills both rings."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
    # (batch, head pair) slowest, heaviest query blocks first (as .sparse_fwd; a pair shares its KV head when GROUP > 1)
    pid = gl.program_id(0)
    bp = pid // NQ
    qblk = NQ - 1 - pid % NQ
    b = bp // (HQ // 2)
    h0 = (bp % (HQ // 2)) * 2
    b64 = b.to(gl.int64)
    pos0 = qblk * 64
    list0 = LIdx + b64 * stride_ib + h0.to(gl.int64) * stride_ih + qblk.to(gl.int64) * stride_iq
    list1 = list0 + stride_ih
    cnt0 = gl.load(LNum + b64 * stride_nb + h0.to(gl.int64) * stride_nh + qblk)
    cnt1 = gl.load(LNum + b64 * stride_nb + (h0 + 1).to(gl.int64) * stride_nh + qblk)

    q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [128, HEAD_DIM], smem)
    k_ring0 = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, 64, HEAD_DIM], smem)
    v_ring0 = gl.allocate_shared_memory(V.dtype.element_ty, [STAGES, 64, HEAD_DIM], smem)
    k_ring1 = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, 64, HEAD_DIM], smem)
    v_ring1 = gl.allocate_shared_memory(V.dtype.element_ty, [STAGES, 64, HEAD_DIM], smem)
    ready0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready0.index(i), count=1)
        mbarrier.init(empty0.index(i), count=1)
        mbarrier.init(ready1.index(i), count=1)
        mbarrier.init(empty1.index(i), count=1)
    # Q rows: head h0's 64 positions, then head h0 + 1's
    r = gl.arange(0, 128, layout=gl.SliceLayout(1, ld))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    pos = pos0 + r % 64
    q_off = b64 * stride_qb + (h0 + r // 64).to(gl.int64) * stride_qh + pos.to(gl.int64) * stride_qt
    async_copy.async_copy_global_to_shared(q_smem, Q + q_off[:, None] + cols[None, :], mask=(pos < T)[:, None])
    async_copy.commit_group()
    async_copy.wait_group(0)
    gl.thread_barrier()
    fence_async_shared()
    kv0 = (h0 // GROUP).to(gl.int64)
    kv1 = ((h0 + 1) // GROUP).to(gl.int64)
    O0 = Out + b64 * stride_ob
    L0 = Lse + b64 * stride_lb
    # each warpgroup: P = 64 positions of one head (row r: head h0 or h0 + 1, position pos0 + r)
    gl.warp_specialize(
        [(_math, (q_smem.slice(0, 64), k_ring0, v_ring0, ready0, empty0, list0, cnt0, qblk, 0, pos0, h0, T, qk_scale,
                  O0, L0, stride_oh, stride_ot, stride_lh, 64, HEAD_DIM, STAGES, STORE_LSE, 64, 64)),
         (_math, (q_smem.slice(64, 64), k_ring1, v_ring1, ready1, empty1, list1, cnt1, qblk, 0, pos0, h0 + 1, T,
                  qk_scale, O0, L0, stride_oh, stride_ot, stride_lh, 64, HEAD_DIM, STAGES, STORE_LSE, 64, 64)),
         (_loader_pair, (K + b64 * stride_kb + kv0 * stride_kh, V + b64 * stride_vb + kv0 * stride_vh,
                         K + b64 * stride_kb + kv1 * stride_kh, V + b64 * stride_vb + kv1 * stride_vh,
                         (k_ring0, v_ring0), (k_ring1, v_ring1), ready0, ready1, empty0, empty1, list0, list1, cnt0,
                         cnt1, T, stride_kt, stride_vt, HEAD_DIM, STAGES))],
        [4, 1], [232, 24],
    )  # fmt: skip


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's global scratch for the device-built TMA descriptors (a few hundred bytes a program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def launch(q, k, v, out, lse, kv_num_blocks, kv_indices, scale: float, mask_block: int = 64, block_n: int = 64) -> None:
    """Run the kernel (the case checked by :func:`supported`): out [B, Hq, T, D] (``[B, T, Hq, D]`` memory), lse
    [B, Hq, T] fp32 or None; lists int32 [B, H, NQ(, NK)] of ``mask_block``-token blocks, H = Hq (per query head) or
    Hkv (per group). ``block_n``: keys a step, 64 (a kept 64-token block) or 128 (two kept 64-token blocks, or one
    128-token block; per-group masks only)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    nq = kv_indices.shape[2]
    group = hq // hkv
    per_head = kv_indices.shape[1] == hq
    if (mask_block, block_n) not in STEPS or (per_head and block_n != 64):
        raise ValueError(
            f"sparse_fwd_ws.launch: (mask_block, block_n) must be one of {STEPS} (block_n 128 with per-group masks "
            f"only), got ({mask_block}, {block_n}) with {'per-query-head' if per_head else 'per-group'} masks"
        )
    lse_arg = lse if lse is not None else out  # never written without STORE_LSE
    args = (
        q, k, v, out, lse_arg, kv_num_blocks, kv_indices, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse_arg.stride(0), lse_arg.stride(1), kv_num_blocks.stride(0), kv_num_blocks.stride(1),
        kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2), t,
    )  # fmt: skip
    if per_head:  # two heads a program
        kernel, grid, extra = _sparse_fwd_ws_heads_kernel, b * (hq // 2) * nq, (hq, nq, group)
        consts = dict(STAGES=STAGES_HEADS)
    else:  # per-group masks: G / 2 programs a 64-token query block
        kernel, grid, extra = _sparse_fwd_ws_kernel, b * hkv * nq * (group * mask_block // 128), (hkv, nq)
        consts = dict(G=group, STAGES=stages(block_n), MB=mask_block, BLOCK_N=block_n)

    def run():
        triton.set_allocator(_scratch)  # in the copied context below: the caller's allocator is left as it was
        kernel[(grid,)](*args, *extra, HEAD_DIM=d, STORE_LSE=lse is not None, num_warps=4, **consts)

    contextvars.copy_context().run(run)
