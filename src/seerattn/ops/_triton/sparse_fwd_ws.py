"""Block-sparse causal forward for Hopper in Gluon: warp-specialised tiles for 64-token mask blocks (per-group or
per-query-head masks) and 128-token ones (per group).

Algorithm
---------
The same attention as :mod:`.sparse_fwd` (online softmax in the log2 domain over the kept key blocks of a mask row, the
diagonal block masked causally), scheduled by hand with Gluon (``triton.experimental.gluon``: mbarriers, TMA, async
wgmma and ``warp_specialize``, which the compiler-scheduled Triton kernels cannot use on Hopper):

- **persistent** programs, one a multiprocessor, each walking its share of the tiles (one a round, programs in
  alternating order: :func:`_program_tile`), so that a tile's first loads land while the tile before finishes its
  last product and stores;
- per-group masks (:func:`_sparse_fwd_ws_kernel`): a tile is 128 query rows, ``P = 128 / G`` consecutive positions of
  one query block for the ``G`` query heads of one KV group (they share the block's list and every K/V tile); the
  same kernel takes per-query-head masks at 128-token blocks with ``G`` = 1 (a tile: 128 positions of one head, one
  list, each math warpgroup 64 of the positions; since session 21);
- a **loader warp** copies each tile's first K / V step, its Q (once the math warpgroups are done with the last tile's
  scores), then walks the rest of the list (``kv_indices[b, g, I, :kv_num_blocks[b, g, I]]``) and copies the kept
  blocks' K and V tiles by TMA into a ring of slots in shared memory (an mbarrier ``ready`` per slot, signalled by the
  copies' bytes; an mbarrier ``empty`` per slot, which both math warpgroups arrive on when done with it). A slot holds a
  step's keys (``BLOCK_N``): 64 (one kept 64-token block; ``STAGES`` slots) or 128 (``STAGES_PAIR`` slots: two kept
  64-token blocks, list entries ``2j`` and ``2j + 1`` in the slot's two halves, or one 128-token block), so that a
  step's scores are one ``N = 128`` wgmma and the online softmax's per-step work (row max, rescaling the output
  accumulator) is spread over twice the keys;
- **two math warpgroups** (4 warps each) own 64 of the rows each and run independently: scores ``S = Q K^T`` (wgmma from
  shared memory), the online softmax in registers, ``O += P V`` (P from registers), software-pipelined (step ``j``'s
  scores issued with step ``j - 1``'s ``P V``, FlashAttention-3's overlap within a warpgroup: :func:`_attend`); one's
  softmax also runs while the other's products do (FlashAttention-3's ping-pong, left to the warp schedulers; explicit
  turn-taking through mbarriers measured 15 % slower). Blocks from the diagonal on are masked causally; rows with an
  empty list give zeros and lse ``-inf``;
- per-query-head masks (:func:`_sparse_fwd_ws_heads_kernel`): a tile is one query block of two query heads, each math
  warpgroup one head with its own list, ring and barriers (``STAGES_HEADS`` slots each), and the loader warp fills both
  rings step by step alternately; or (the union kernel, :func:`_sparse_fwd_ws_union_kernel`, since session 22) two
  consecutive query blocks of one head, each math warpgroup one block with its own list, over one ring that holds each
  block of the merge of the two lists once (two a 128-key slot): a warpgroup frees the slots without its blocks, masks
  off the other's half of a slot, and completes a pending ``P V`` before waiting on a step whose copy needs that
  ``P V``'s slot. On structured masks it copies half the tiles; measured (docs/experiments/kernel-speed/session22) it
  is 1.00-1.09x the head-pair kernel at 128k / 10 % on structured masks, level at 32k, 1.4-1.6x slower on random ones
  (each row computes the other's blocks of its slots): a tuning candidate.

Measured against the Triton kernel's tiles, FlexAttention and FlashAttention-4 on the same masks (H200, 32k, 32 / 8
heads, D 128, bf16, 10 %; docs/experiments/kernel-speed/session18, calls 6-7): per group 2.000 ms (the Triton tiles'
best 2.171, FA4 2.180); per query head 2.157 / 2.040 on structured / random masks (the Triton 64-row tile 2.393 /
2.415, FA4 2.107 / 2.230). 128-key steps (docs/experiments/kernel-speed/session19): all blocks kept 564-568 TFLOP/s
(FA4 667), block 64 / 10 % 1.88-1.97 ms, 1.20x FA4 at 128k. Software-pipelined and persistent
(docs/experiments/kernel-speed/session20): block 64 / 10 % 1.704 ms against FA4's 2.259 (1.33x), all blocks kept 620
TFLOP/s; per query head 2.002 ms (FA4 2.124); at 128-token blocks FA4 stays ahead (1.464 ms against 1.66-1.70 at
10 %). It is a tuning candidate (:func:`.config.sparse_configs`, ``hopper_ws``): the tuner keeps it where it is
faster.

Layouts: q ``[B, Hq, T, D]``, k / v ``[B, Hkv, T, D]``, any strides with a unit last stride and batch, head and token
strides that TMA accepts (16-byte multiples, 16-byte aligned bases); out ``[B, Hq, T, D]`` shaped, ``[B, T, Hq, D]`` in
memory (as :mod:`.sparse_fwd`); lse ``[B, Hq, T]`` fp32 natural log. Lists int32 ``[B, H, NQ(, NK)]``, H = Hkv or Hq.
A zero batch stride (K / V expanded along the batch) goes into the descriptors as it is (the driver takes it).
Varlen (``cu_seqlens`` int32 ``[N + 1]``, B == 1, lists ``[N, ...]``, each sequence the top-left corner of its mask, as
:mod:`.sparse_fwd`): a sequence's tiles read and write its tokens from ``cu_seqlens[n]``; tiles past its end are
skipped by the loader and the math alike; the rows of a tile past the end (the next sequence's tokens) are computed
and not stored, and the next sequence's keys in a partial last block lie past every stored row, so the causal mask
hides them. Session 21 (docs/experiments/kernel-speed/session21, call 2): four packed prompts of 20k-32k tokens at
10 %, 1.17x the best Triton tile per query head, 1.38x per group (block 64), 1.55x at block 128.

Supported (:func:`supported` says why not): an sm_90 GPU, fp16 / bf16, D 64 or 128, per-group masks with ``G`` in
(2, 4, 8) query heads a group at 64- or 128-token blocks, per-query-head masks at 128-token blocks (any GQA group, MHA
included) and at 64-token blocks with an even head count (two heads a tile, 64-key steps: two rings of 128-key slots
would not fit in shared memory). Limitations: forward only; Gluon has
no interpreter, so the CPU tests compile it for sm_90 (``benchmarks/sm90.py``) and only the GPU tests run it. Q, K
and V reach the kernel as host TMA descriptors of their ``[B, H, T, D]`` views (``[1, 1, rows, D]`` boxes, the
shared buffers 4-D to match and read as ``[rows, D]`` by the products).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .common import LN2, LOG2E
from .config import num_sms

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
# wgmma N = 128 for the scores), or a 128-token block a step; per-query-head masks: at 64-token blocks the per-head
# kernel's 64-key steps, at 128-token blocks the per-group kernel's (128, 128)
STEPS = ((64, 64), (64, 128), (128, 128))
# 128-key slots at D 128: Q 32 KiB + STAGES_PAIR x 64 KiB
STAGES_PAIR = 3


def stages(block_n: int) -> int:
    """The per-group kernel's ring depth: ``STAGES`` 64-key or ``STAGES_PAIR`` 128-key slots."""
    return STAGES if block_n == 64 else STAGES_PAIR


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_block: int, mask_heads: int) -> str | None:
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
    if mask_heads == hq:  # 64-token blocks: two heads a tile (the per-head kernel); 128: one (the per-group kernel)
        if mask_block == 64 and hq % 2:
            return f"pairs query heads for per-query-head masks at 64-token blocks: needs an even head count, got {hq}"
    elif mask_heads != hkv or hq // hkv not in GROUPS:
        return (
            f"takes per-query-head masks, or per-group masks with {GROUPS} query heads a group; got {mask_heads} mask "
            f"heads for {hq} / {hkv}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.data_ptr() % 16 or any((stride * x.element_size()) % 16 for stride in x.stride()[:3]):
            return (
                f"needs {name} at a 16-byte aligned address with batch, head and token strides in 16-byte multiples "
                f"(TMA), got address {x.data_ptr()} and strides {x.stride()}"
            )
    return None


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
def _mask_row(LNum, LIdx, b, h, qblk, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq):
    """Mask row (b, h, qblk): (a pointer to its kept-block list, the list's length)."""
    b64 = b.to(gl.int64)
    blocks = LIdx + b64 * stride_ib + h.to(gl.int64) * stride_ih + qblk.to(gl.int64) * stride_iq
    cnt = gl.load(LNum + b64 * stride_nb + h.to(gl.int64) * stride_nh + qblk)
    return blocks, cnt


@gluon.jit
def _sequence(CuSeq, b, T, VARLEN: gl.constexpr):
    """Sequence ``b`` of the call: (its batch index in q / k / v / out, its first token there, its length). Varlen:
    sequences packed along batch 0's tokens, ``CuSeq`` [N + 1] their bounds; else batch ``b``, tokens 0 .. T."""
    if VARLEN:
        t0 = gl.load(CuSeq + b)
        return b * 0, t0, gl.load(CuSeq + b + 1) - t0
    else:
        return b, b * 0, T


@gluon.jit
def _program_tile(rnd):
    """This program's tile of round ``rnd`` (one tile a program a round, at or past the count in the last round):
    programs in order on even rounds and in reverse on odd ones. Tiles run heaviest first within a (batch, head) row
    of lists, so walking ``p, p + programs, ..`` would hand the low programs the heavier tile of every round; the
    alternation pairs each heavy tile with a light one (the static form of the hardware's dynamic block scheduling
    that a non-persistent launch had)."""
    p = gl.program_id(0)
    n = gl.num_programs(0)
    return rnd * n + p + (rnd % 2) * (n - 1 - 2 * p)


@gluon.jit
def _group_tile(tile, NQ, HM, MB: gl.constexpr, G: gl.constexpr):
    """Tile ``tile`` of the per-group kernel -> (batch, mask head, query block, first position): (batch, mask head)
    slowest, query blocks heaviest first, a block's ``MB / P`` tiles fastest (as .sparse_fwd's programs)."""
    P: gl.constexpr = 128 // G
    SPLIT: gl.constexpr = MB // P
    per = NQ * SPLIT
    bg = tile // per
    t = per - 1 - tile % per
    qblk = t // SPLIT
    return bg // HM, bg % HM, qblk, qblk * MB + (t % SPLIT) * P


@gluon.jit
def _heads_tile(tile, NQ, HQ):
    """Tile ``tile`` of the per-query-head kernel -> (batch, first of its two query heads, query block): (batch,
    head pair) slowest, query blocks heaviest first."""
    bp = tile // NQ
    return bp // (HQ // 2), (bp % (HQ // 2)) * 2, NQ - 1 - tile % NQ


@gluon.jit
def _copy_q(q_desc, q4, q_ready, q_empty, b, head0, pos0, use, ROW0: gl.constexpr, HEADS: gl.constexpr,
            P: gl.constexpr):  # fmt: skip
    """A math warpgroup's Q rows of a tile by TMA (rows ``ROW0 ..`` of ``q4`` [1, 1, 128, D]: ``HEADS`` heads from
    ``head0``, ``P`` positions from ``pos0`` each; past T TMA's zero fill), once the warpgroup is done with the
    previous tile's (``use``: the buffer's uses so far; a fresh ``q_empty`` passes its first wait)."""
    mbarrier.wait(q_empty, (use & 1) ^ 1)
    mbarrier.expect(q_ready, HEADS * q_desc.block_type.nbytes)
    for hh in gl.static_range(HEADS):
        tma.async_copy_global_to_shared(q_desc, [b, head0 + hh, pos0, 0], q_ready, q4.slice(ROW0 + hh * P, P, dim=2))


@gluon.jit
def _copy_keys(k_desc, v_desc, k_ring, v_ring, ready, empty, b, h, t0, first, second, it,
               STAGES: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """The ring's ``it``-th step: KV head (b, h)'s K and V tiles of 64-token blocks ``first`` (and ``second``, the
    second half of a 128-key slot; the sequence's tokens from ``t0``) by TMA into slot ``it % STAGES`` once the math
    warpgroups freed it (a fresh ``empty`` passes its first wait: parity 1 of the phase before); ``ready`` counts the
    bytes."""
    slot = it % STAGES
    mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(slot), (BLOCK_N // 32) * k_desc.block_type.nbytes)
    k_slot = k_ring.index(slot)
    v_slot = v_ring.index(slot)
    row_a = t0 + first * 64
    row_b = t0 + second * 64
    if BLOCK_N == 64:
        tma.async_copy_global_to_shared(k_desc, [b, h, row_a, 0], ready.index(slot), k_slot)
        tma.async_copy_global_to_shared(v_desc, [b, h, row_a, 0], ready.index(slot), v_slot)
    else:
        tma.async_copy_global_to_shared(k_desc, [b, h, row_a, 0], ready.index(slot), k_slot.slice(0, 64, dim=2))
        tma.async_copy_global_to_shared(k_desc, [b, h, row_b, 0], ready.index(slot), k_slot.slice(64, 64, dim=2))
        tma.async_copy_global_to_shared(v_desc, [b, h, row_a, 0], ready.index(slot), v_slot.slice(0, 64, dim=2))
        tma.async_copy_global_to_shared(v_desc, [b, h, row_b, 0], ready.index(slot), v_slot.slice(64, 64, dim=2))


@gluon.jit
def _copy_step(k_desc, v_desc, k_ring, v_ring, ready, empty, b, h, t0, blocks, cnt, j, it,
               STAGES: gl.constexpr, MB: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """Step ``j`` of a list (the ring's ``it``-th step overall): its blocks (:func:`_step_blocks`) by
    :func:`_copy_keys`."""
    first, second = _step_blocks(blocks, cnt, j, MB, BLOCK_N)
    _copy_keys(k_desc, v_desc, k_ring, v_ring, ready, empty, b, h, t0, first, second, it, STAGES, BLOCK_N)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q4, k_ring, v_ring, q_ready, q_empty, ready, empty, LNum, LIdx, CuSeq,
            stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, T, NQ, HM, GROUP, num_tiles,
            G: gl.constexpr, STAGES: gl.constexpr, MB: gl.constexpr, BLOCK_N: gl.constexpr,
            VARLEN: gl.constexpr):  # fmt: skip
    """The loader warp of the per-group kernel, over the program's tiles (those past their sequence's end skipped, as
    the math warpgroups skip them): each tile's first K / V step, its Q (once the math warpgroups are done with the
    last tile's: the first step can land during their last product and stores), then the rest of its list, step by
    step into the ring."""
    P: gl.constexpr = 128 // G
    it = 0
    use = 0
    for rnd in range(gl.cdiv(num_tiles, gl.num_programs(0))):
        tile = _program_tile(rnd)
        if tile < num_tiles:
            b, g, qblk, pos0 = _group_tile(tile, NQ, HM, MB, G)
            bt, t0, seqlen = _sequence(CuSeq, b, T, VARLEN)
            if pos0 < seqlen:
                kv = g * G // GROUP  # the tile's KV head (g itself with per-group masks)
                blocks, cnt = _mask_row(LNum, LIdx, b, g, qblk, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq)
                n = _num_steps(cnt, MB, BLOCK_N)
                if n > 0:
                    _copy_step(k_desc, v_desc, k_ring, v_ring, ready, empty, bt, kv, t0, blocks, cnt, 0, it, STAGES, MB,
                               BLOCK_N)  # fmt: skip
                for half in gl.static_range(2):
                    if G == 1:  # warpgroup `half`'s 64 rows: positions 64 * half .. of the tile's one head
                        _copy_q(q_desc, q4, q_ready.index(half), q_empty.index(half), bt, g, t0 + pos0 + half * 64, use,
                                half * 64, 1, 64)  # fmt: skip
                    else:  # warpgroup `half`'s 64 rows: G / 2 heads of P positions
                        _copy_q(q_desc, q4, q_ready.index(half), q_empty.index(half), bt, g * G + half * (G // 2),
                                t0 + pos0, use, half * 64, G // 2, P)  # fmt: skip
                for j in range(1, n):
                    _copy_step(k_desc, v_desc, k_ring, v_ring, ready, empty, bt, kv, t0, blocks, cnt, j, it + j, STAGES,
                               MB, BLOCK_N)  # fmt: skip
                it += n
                use += 1


@gluon.jit
def _full_steps(blocks, cnt, qb, MB: gl.constexpr, BLOCK_N: gl.constexpr):
    """The leading steps of a list that hold only blocks left of the diagonal 64-token block ``qb`` (no causal mask,
    no list loads in the math): the list ascends, so the blocks at or right of the diagonal trail it (one or two,
    counted from the end); a pair step is full when both its entries are, so an odd list's last step never is."""
    bound = qb if MB == 64 else qb // 2  # a 128-token block e holds 64-token blocks 2e and 2e + 1
    low = cnt
    last = gl.load(blocks + gl.maximum(low - 1, 0))
    while (low > 0) & (last >= bound):
        low -= 1
        last = gl.load(blocks + gl.maximum(low - 1, 0))
    if MB == 64 and BLOCK_N == 128:
        low = low // 2
    return low


@gluon.jit
def _softmax_step(s, m_i, l_i, j, masked, blocks, cnt, qb, pos_s, cols_s, qk_scale,
                  MB: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """Step ``j``'s online softmax on its raw scores ``s`` [64, BLOCK_N]: the causal mask where ``masked`` (a step
    from :func:`_full_steps` on), the new running max and sum; returns (``p``: the step's probabilities relative to the
    new max, ``alpha``: the factor that rescales what was accumulated before the step, ``m_i``, ``l_i``)."""
    if masked:  # the diagonal block (policies keep nothing above it), or an odd list's half step: causal
        blk_a, blk_b = _step_blocks(blocks, cnt, j, MB, BLOCK_N)
        if MB == 64 and BLOCK_N == 128:
            if 2 * j + 1 >= cnt:  # an odd list's last step: its repeated block masked off as if past the diagonal
                blk_b = qb + 1
        keep = _slot_keys(blk_a, blk_b, cols_s, BLOCK_N)[None, :] <= pos_s[:, None]
        s = gl.where(keep, s, float("-inf"))
    return _online_softmax(s, m_i, l_i, qk_scale)


@gluon.jit
def _slot_keys(blk_a, blk_b, cols_s, BLOCK_N: gl.constexpr):
    """The key position of each column ``cols_s`` of a slot holding 64-token block ``blk_a`` (and, a 128-key slot's
    second half, ``blk_b``)."""
    if BLOCK_N == 64:
        return blk_a * 64 + cols_s
    else:
        return gl.where(cols_s < 64, blk_a * 64 + cols_s, blk_b * 64 + cols_s - 64)


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """A step's online softmax on its (masked) raw scores ``s`` [64, N]: (``p``, ``alpha``, ``m_i``, ``l_i``) as
    :func:`_softmax_step` returns them."""
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
def _attend(q_smem, k_ring, v_ring, ready, empty, q_empty, blocks, cnt, it, qb, row0, pos0, head0, T, qk_scale,
            Out, Lse, stride_oh, stride_ot, stride_lh,
            P: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr,
            MB: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """One tile of a math warpgroup: rows ``row0 .. row0 + 63`` of the tile's 128 (row r = head ``head0 + r // P``,
    position ``pos0 + r % P``; ``qb``: the 64-token block of ``pos0``) against every kept block of the list, a step at
    a time (``BLOCK_N`` keys: :func:`_step_blocks`; the ring's steps ``it ..``), then its output and lse stores (rows
    at or past T skipped). Frees its Q rows (``q_empty``) after its last scores. Returns the steps taken.

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
    n_full = _full_steps(blocks, cnt, qb, MB, BLOCK_N)
    if n > 0:  # step 0: scores and softmax only (nothing accumulated yet to rescale)
        slot = it % STAGES
        mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
        k_tile = k_ring.index(slot).reshape([BLOCK_N, HEAD_DIM])
        s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), s_zero, use_acc=False)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, n_full <= 0, blocks, cnt, qb, pos_s, cols_s, qk_scale,
                                           MB, BLOCK_N)  # fmt: skip
        p16 = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    for j in range(1, n):
        slot = (it + j) % STAGES
        prev = (it + j - 1) % STAGES
        mbarrier.wait(ready.index(slot), ((it + j) // STAGES) & 1)
        k_tile = k_ring.index(slot).reshape([BLOCK_N, HEAD_DIM])
        s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p16, v_ring.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s])  # the scores (issued first) are in; P V_{j-1} may still run
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j, j >= n_full, blocks, cnt, qb, pos_s, cols_s, qk_scale,
                                           MB, BLOCK_N)  # fmt: skip
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index(prev))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p16 = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    mbarrier.arrive(q_empty)  # every score of the tile is in: the loader may bring the next tile's Q
    if n > 0:  # the last step's P V
        last = (it + n - 1) % STAGES
        acc = warpgroup_mma(p16, v_ring.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index(last))
    _store_rows(acc, m_i, l_i, row0, pos0, head0, T, Out, Lse, stride_oh, stride_ot, stride_lh, P, HEAD_DIM,
                STORE_LSE, s_layout, o_layout)  # fmt: skip
    return n


@gluon.jit
def _store_rows(acc, m_i, l_i, row0, pos0, head0, T, Out, Lse, stride_oh, stride_ot, stride_lh, P: gl.constexpr,
                HEAD_DIM: gl.constexpr, STORE_LSE: gl.constexpr, s_layout: gl.constexpr,
                o_layout: gl.constexpr):  # fmt: skip
    """A math warpgroup's epilogue: its 64 rows (row r = head ``head0 + (row0 + r) // P``, position ``pos0 + (row0 +
    r) % P``) normalised and stored (rows at or past T skipped), and their lse (natural log); empty rows give zeros
    and ``-inf``."""
    empty_row = l_i == 0.0
    acc = acc / gl.convert_layout(gl.where(empty_row, 1.0, l_i), gl.SliceLayout(1, o_layout))[:, None]
    r_o = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
    pos_o = pos0 + r_o % P
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_off = (head0 + r_o // P).to(gl.int64) * stride_oh + pos_o.to(gl.int64) * stride_ot
    gl.store(Out + o_off[:, None] + cols_o[None, :], acc.to(Out.dtype.element_ty), mask=(pos_o < T)[:, None])
    if STORE_LSE:
        r_s = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
        pos_s = pos0 + r_s % P
        lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(gl.where(empty_row, 1.0, l_i))) * LN2)
        l_off = (head0 + r_s // P).to(gl.int64) * stride_lh + pos_s
        gl.store(Lse + l_off, lse, mask=pos_s < T)


@gluon.jit
def _math(q_smem, k_ring, v_ring, q_ready, q_empty, ready, empty, LNum, LIdx, CuSeq, qk_scale, Out, Lse,
          stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, stride_ob, stride_oh, stride_ot, stride_lb, stride_lh,
          T, NQ, HM, num_tiles, ROW0: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
          STORE_LSE: gl.constexpr, MB: gl.constexpr, BLOCK_N: gl.constexpr, VARLEN: gl.constexpr):  # fmt: skip
    """A math warpgroup of the per-group kernel: rows ``ROW0 .. ROW0 + 63`` of each of the program's tiles (those
    past their sequence's end skipped)."""
    it = 0
    use = 0
    for rnd in range(gl.cdiv(num_tiles, gl.num_programs(0))):
        tile = _program_tile(rnd)
        if tile < num_tiles:
            b, g, qblk, pos0 = _group_tile(tile, NQ, HM, MB, G)
            bt, t0, seqlen = _sequence(CuSeq, b, T, VARLEN)
            if pos0 < seqlen:
                blocks, cnt = _mask_row(LNum, LIdx, b, g, qblk, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq)
                mbarrier.wait(q_ready, use & 1)
                out = Out + bt.to(gl.int64) * stride_ob + t0.to(gl.int64) * stride_ot
                lse = Lse + bt.to(gl.int64) * stride_lb + t0
                # a tile's positions lie in one mask block; qb = pos0 // 64 is the diagonal (with 128-token blocks
                # its 128-token block qb // 2, for both halves of a one-head tile)
                it += _attend(q_smem, k_ring, v_ring, ready, empty, q_empty, blocks, cnt, it, pos0 // 64, ROW0, pos0,
                              g * G, seqlen, qk_scale, out, lse, stride_oh, stride_ot, stride_lh, 128 // G, HEAD_DIM,
                              STAGES, STORE_LSE, MB, BLOCK_N)  # fmt: skip
                use += 1


@gluon.jit
def _sparse_fwd_ws_kernel(
    q_desc, k_desc, v_desc, Out, Lse, LNum, LIdx, CuSeq, qk_scale,
    stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    T, HM, NQ, GROUP, num_tiles,
    G: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr, MB: gl.constexpr,
    BLOCK_N: gl.constexpr, VARLEN: gl.constexpr,
):  # fmt: skip
    """Per-group masks (and per-query-head masks at 128-token blocks: ``G`` = 1), persistent: each program walks its
    tiles (:func:`_program_tile`, decoded by :func:`_group_tile`), each 128 rows (the ``G`` query heads of one of the
    ``HM`` masks x 128 / G positions of one query block; ``GROUP`` query heads a KV head); one loader warp, two math
    warpgroups of 64 rows."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    # 4-D buffers as the [B, H, T, D] descriptors' boxes; the products read them as [rows, D]
    q4 = gl.allocate_shared_memory(q_desc.dtype, [1, 1, 128, HEAD_DIM], smem)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], smem)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], smem)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both math warpgroups free a slot
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    q2 = q4.reshape([128, HEAD_DIM])
    # the partitions' argument tuples inline: a tuple bound to a name first turns its constexprs into tensors
    gl.warp_specialize(
        [(_math, (q2.slice(0, 64), k_ring, v_ring, q_ready.index(0), q_empty.index(0), ready, empty, LNum, LIdx,
                  CuSeq, qk_scale, Out, Lse, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, stride_ob,
                  stride_oh, stride_ot, stride_lb, stride_lh, T, NQ, HM, num_tiles, 0, G, HEAD_DIM, STAGES, STORE_LSE,
                  MB, BLOCK_N, VARLEN)),
         (_math, (q2.slice(64, 64), k_ring, v_ring, q_ready.index(1), q_empty.index(1), ready, empty, LNum, LIdx,
                  CuSeq, qk_scale, Out, Lse, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, stride_ob,
                  stride_oh, stride_ot, stride_lb, stride_lh, T, NQ, HM, num_tiles, 64, G, HEAD_DIM, STAGES,
                  STORE_LSE, MB, BLOCK_N, VARLEN)),
         (_loader, (q_desc, k_desc, v_desc, q4, k_ring, v_ring, q_ready, q_empty, ready, empty, LNum, LIdx, CuSeq,
                    stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, T, NQ, HM, GROUP, num_tiles, G, STAGES, MB,
                    BLOCK_N, VARLEN))],
        [4, 1], [232, 24],
    )  # fmt: skip


@gluon.jit
def _loader_pair(q_desc, k_desc, v_desc, q4, ring0, ring1, q_ready, q_empty, ready0, ready1, empty0, empty1, LNum,
                 LIdx, CuSeq, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, T, NQ, HQ, GROUP, num_tiles,
                 STAGES: gl.constexpr, VARLEN: gl.constexpr):  # fmt: skip
    """The loader warp of the per-query-head kernel, over the program's tiles: two lists a tile (one a math
    warpgroup), each into its own ring (``ring0`` / ``ring1`` = (K slots, V slots)), step by step alternately, so
    neither warpgroup waits for the other's list to be loaded first; the tile's Q after the first steps (as
    :func:`_loader`; tiles past their sequence's end skipped)."""
    it0 = 0
    it1 = 0
    use = 0
    for rnd in range(gl.cdiv(num_tiles, gl.num_programs(0))):
        tile = _program_tile(rnd)
        if tile < num_tiles:
            b, h0, qblk = _heads_tile(tile, NQ, HQ)
            bt, t0, seqlen = _sequence(CuSeq, b, T, VARLEN)
            if qblk * 64 < seqlen:
                list0, cnt0 = _mask_row(LNum, LIdx, b, h0, qblk, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq)
                list1, cnt1 = _mask_row(LNum, LIdx, b, h0 + 1, qblk, stride_nb, stride_nh, stride_ib, stride_ih,
                                        stride_iq)  # fmt: skip
                kv0 = h0 // GROUP
                kv1 = (h0 + 1) // GROUP
                if cnt0 > 0:
                    _copy_step(k_desc, v_desc, ring0[0], ring0[1], ready0, empty0, bt, kv0, t0, list0, cnt0, 0, it0,
                               STAGES, 64, 64)  # fmt: skip
                if cnt1 > 0:
                    _copy_step(k_desc, v_desc, ring1[0], ring1[1], ready1, empty1, bt, kv1, t0, list1, cnt1, 0, it1,
                               STAGES, 64, 64)  # fmt: skip
                for half in gl.static_range(2):  # warpgroup `half`: head h0 + half's 64 positions
                    _copy_q(q_desc, q4, q_ready.index(half), q_empty.index(half), bt, h0 + half, t0 + qblk * 64, use,
                            half * 64, 1, 64)  # fmt: skip
                for j in range(1, gl.maximum(cnt0, cnt1)):
                    if j < cnt0:
                        _copy_step(k_desc, v_desc, ring0[0], ring0[1], ready0, empty0, bt, kv0, t0, list0, cnt0, j,
                                   it0 + j, STAGES, 64, 64)  # fmt: skip
                    if j < cnt1:
                        _copy_step(k_desc, v_desc, ring1[0], ring1[1], ready1, empty1, bt, kv1, t0, list1, cnt1, j,
                                   it1 + j, STAGES, 64, 64)  # fmt: skip
                it0 += cnt0
                it1 += cnt1
                use += 1


@gluon.jit
def _math_heads(q_smem, k_ring, v_ring, q_ready, q_empty, ready, empty, LNum, LIdx, CuSeq, qk_scale, Out, Lse,
                stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, stride_ob, stride_oh, stride_ot, stride_lb,
                stride_lh, T, NQ, HQ, num_tiles, WG: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                STORE_LSE: gl.constexpr, VARLEN: gl.constexpr):  # fmt: skip
    """A math warpgroup of the per-query-head kernel: head ``h0 + WG`` of each of the program's tiles (those past
    their sequence's end skipped), its own list and ring."""
    it = 0
    use = 0
    for rnd in range(gl.cdiv(num_tiles, gl.num_programs(0))):
        tile = _program_tile(rnd)
        if tile < num_tiles:
            b, h0, qblk = _heads_tile(tile, NQ, HQ)
            bt, t0, seqlen = _sequence(CuSeq, b, T, VARLEN)
            if qblk * 64 < seqlen:
                blocks, cnt = _mask_row(LNum, LIdx, b, h0 + WG, qblk, stride_nb, stride_nh, stride_ib, stride_ih,
                                        stride_iq)  # fmt: skip
                mbarrier.wait(q_ready, use & 1)
                out = Out + bt.to(gl.int64) * stride_ob + t0.to(gl.int64) * stride_ot
                lse = Lse + bt.to(gl.int64) * stride_lb + t0
                it += _attend(q_smem, k_ring, v_ring, ready, empty, q_empty, blocks, cnt, it, qblk, 0, qblk * 64,
                              h0 + WG, seqlen, qk_scale, out, lse, stride_oh, stride_ot, stride_lh, 64, HEAD_DIM,
                              STAGES, STORE_LSE, 64, 64)  # fmt: skip
                use += 1


@gluon.jit
def _sparse_fwd_ws_heads_kernel(
    q_desc, k_desc, v_desc, Out, Lse, LNum, LIdx, CuSeq, qk_scale,
    stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    T, HQ, NQ, GROUP, num_tiles,
    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr, VARLEN: gl.constexpr,
):  # fmt: skip
    """Per-query-head masks, persistent: a tile is one 64-token query block of two query heads (``2p``, ``2p + 1``),
    each math warpgroup one head with its own list, K / V ring and barriers; one loader warp fills both rings."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    q4 = gl.allocate_shared_memory(q_desc.dtype, [1, 1, 128, HEAD_DIM], smem)
    k_ring0 = gl.allocate_shared_memory(k_desc.dtype, [STAGES, 1, 1, 64, HEAD_DIM], smem)
    v_ring0 = gl.allocate_shared_memory(v_desc.dtype, [STAGES, 1, 1, 64, HEAD_DIM], smem)
    k_ring1 = gl.allocate_shared_memory(k_desc.dtype, [STAGES, 1, 1, 64, HEAD_DIM], smem)
    v_ring1 = gl.allocate_shared_memory(v_desc.dtype, [STAGES, 1, 1, 64, HEAD_DIM], smem)
    ready0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready0.index(i), count=1)
        mbarrier.init(empty0.index(i), count=1)
        mbarrier.init(ready1.index(i), count=1)
        mbarrier.init(empty1.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    q2 = q4.reshape([128, HEAD_DIM])
    gl.warp_specialize(
        [(_math_heads, (q2.slice(0, 64), k_ring0, v_ring0, q_ready.index(0), q_empty.index(0), ready0, empty0, LNum,
                        LIdx, CuSeq, qk_scale, Out, Lse, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
                        stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, T, NQ, HQ, num_tiles, 0, HEAD_DIM,
                        STAGES, STORE_LSE, VARLEN)),
         (_math_heads, (q2.slice(64, 64), k_ring1, v_ring1, q_ready.index(1), q_empty.index(1), ready1, empty1, LNum,
                        LIdx, CuSeq, qk_scale, Out, Lse, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
                        stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, T, NQ, HQ, num_tiles, 1, HEAD_DIM,
                        STAGES, STORE_LSE, VARLEN)),
         (_loader_pair, (q_desc, k_desc, v_desc, q4, (k_ring0, v_ring0), (k_ring1, v_ring1), q_ready, q_empty, ready0,
                         ready1, empty0, empty1, LNum, LIdx, CuSeq, stride_nb, stride_nh, stride_ib, stride_ih,
                         stride_iq, T, NQ, HQ, GROUP, num_tiles, STAGES, VARLEN))],
        [4, 1], [232, 24],
    )  # fmt: skip


@gluon.jit
def _union_tile(tile, NQ, HQ):
    """Tile ``tile`` of the per-query-head union kernel -> (batch, head, the first query block of its pair): (batch,
    head) slowest, pairs heaviest first."""
    pairs = (NQ + 1) // 2
    bh = tile // pairs
    return bh // HQ, bh % HQ, 2 * (pairs - 1 - tile % pairs)


@gluon.jit
def _pair_lists(LNum, LIdx, b, h, qblk, NQ, seqlen, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq):
    """The lists of query blocks ``qblk`` and ``qblk + 1`` of (b, h): (list, length) each; the second one empty where
    that block does not exist (an odd NQ, or past the sequence's end: a varlen list row there is not read)."""
    list0, cnt0 = _mask_row(LNum, LIdx, b, h, qblk, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq)
    list1, cnt1 = _mask_row(LNum, LIdx, b, h, gl.minimum(qblk + 1, NQ - 1), stride_nb, stride_nh, stride_ib, stride_ih,
                            stride_iq)  # fmt: skip
    return list0, cnt0, list1, gl.where((qblk + 1 < NQ) & ((qblk + 1) * 64 < seqlen), cnt1, 0)


@gluon.jit
def _union_next(list0, cnt0, i0, list1, cnt1, i1):
    """The next block of the merged (ascending, duplicates once) walk of two lists at positions ``i0`` / ``i1``: (the
    block, 1 if it is list 0's next entry else 0, the same for list 1)."""
    a = gl.where(i0 < cnt0, gl.load(list0 + gl.minimum(i0, gl.maximum(cnt0 - 1, 0))), 1 << 30)
    c = gl.where(i1 < cnt1, gl.load(list1 + gl.minimum(i1, gl.maximum(cnt1 - 1, 0))), 1 << 30)
    u = gl.minimum(a, c)
    return u, (a == u).to(gl.int32), (c == u).to(gl.int32)


@gluon.jit
def _union_step(list0, cnt0, i0, list1, cnt1, i1, BLOCK_N: gl.constexpr):
    """The next step of the merged walk: one block (64-key steps) or the next two (128-key steps; past the walk's end
    the second is the first again, a member of neither list). Returns (first block, second block, membership flags
    (1 / 0) of the first in list 0 and in list 1, the same for the second, i0, i1 advanced)."""
    ua, a0, a1 = _union_next(list0, cnt0, i0, list1, cnt1, i1)
    i0 += a0
    i1 += a1
    if BLOCK_N == 64:
        return ua, ua, a0, a1, a0, a1, i0, i1
    else:
        more = (i0 < cnt0) | (i1 < cnt1)
        ub, b0, b1 = _union_next(list0, cnt0, i0, list1, cnt1, i1)
        b0 = gl.where(more, b0, 0)
        b1 = gl.where(more, b1, 0)
        return ua, gl.where(more, ub, ua), a0, a1, b0, b1, i0 + b0, i1 + b1


@gluon.jit
def _loader_union(q_desc, k_desc, v_desc, q4, k_ring, v_ring, q_ready, q_empty, ready, empty, LNum, LIdx, CuSeq,
                  stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, T, NQ, HQ, GROUP, num_tiles,
                  STAGES: gl.constexpr, BLOCK_N: gl.constexpr, VARLEN: gl.constexpr):  # fmt: skip
    """The loader warp of the per-query-head union kernel, over the program's tiles: the first step of the merged walk
    of the tile's two lists (:func:`_union_step`), its Q (each query block's 64 rows to its math warpgroup), then the
    rest of the walk, each block once (as :func:`_loader`; tiles past their sequence's end skipped)."""
    it = 0
    use = 0
    for rnd in range(gl.cdiv(num_tiles, gl.num_programs(0))):
        tile = _program_tile(rnd)
        if tile < num_tiles:
            b, h, qblk = _union_tile(tile, NQ, HQ)
            bt, t0, seqlen = _sequence(CuSeq, b, T, VARLEN)
            if qblk * 64 < seqlen:
                list0, cnt0, list1, cnt1 = _pair_lists(LNum, LIdx, b, h, qblk, NQ, seqlen, stride_nb, stride_nh,
                                                       stride_ib, stride_ih, stride_iq)  # fmt: skip
                kv = h // GROUP
                i0 = 0
                i1 = 0
                n = 0
                if cnt0 + cnt1 > 0:
                    ua, ub, a0, a1, b0, b1, i0, i1 = _union_step(list0, cnt0, i0, list1, cnt1, i1, BLOCK_N)
                    _copy_keys(k_desc, v_desc, k_ring, v_ring, ready, empty, bt, kv, t0, ua, ub, it, STAGES, BLOCK_N)
                    n = 1
                for half in gl.static_range(2):  # warpgroup `half`: query block qblk + half
                    _copy_q(q_desc, q4, q_ready.index(half), q_empty.index(half), bt, h, t0 + (qblk + half) * 64, use,
                            half * 64, 1, 64)  # fmt: skip
                while (i0 < cnt0) | (i1 < cnt1):
                    ua, ub, a0, a1, b0, b1, i0, i1 = _union_step(list0, cnt0, i0, list1, cnt1, i1, BLOCK_N)
                    _copy_keys(k_desc, v_desc, k_ring, v_ring, ready, empty, bt, kv, t0, ua, ub, it + n, STAGES,
                               BLOCK_N)  # fmt: skip
                    n += 1
                it += n
                use += 1


@gluon.jit
def _attend_union(q_smem, k_ring, v_ring, ready, empty, q_empty, list0, cnt0, list1, cnt1, it, qb, head, T, qk_scale,
                  Out, Lse, stride_oh, stride_ot, stride_lh, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, STORE_LSE: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """One tile of a math warpgroup of the union kernel: query block ``qb`` (list ``WG`` of the two) over the merged
    walk of both lists (the ring's steps ``it ..``; :func:`_union_step`). A step holding none of its own blocks is
    freed at once (after its copy landed, so that the ring's phases stay in step); a step holding one or two is
    computed as in :func:`_attend` (its scores issued with the previous own step's ``P V``), the half of a 128-key step
    that is not its own masked off. A pending ``P V`` whose slot the loader needs for the step waited on (``STAGES``
    steps on) is completed first and its slot freed: a warpgroup never waits on a copy that waits on it. Returns the
    steps walked."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    pos_s = qb * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    cols_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([64], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([64], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)
    p16 = gl.zeros([64, BLOCK_N], q_smem.dtype, layout=p_layout)
    i0 = 0
    i1 = 0
    n = 0
    pending = 0  # 1: p16 holds the last own step's P, whose V (step `prev` of the ring) is not yet added
    prev = 0
    while (i0 < cnt0) | (i1 < cnt1):
        ua, ub, a0, a1, b0, b1, i0, i1 = _union_step(list0, cnt0, i0, list1, cnt1, i1, BLOCK_N)
        if WG == 0:
            own_a = a0
            own_b = b0
        else:
            own_a = a1
            own_b = b1
        # the causal mask from the diagonal block on, and (128-key steps) a half that is not this row's
        masked = (own_a == 0) | (own_b == 0) | (ub >= qb)
        step = it + n
        if (pending != 0) & (step >= prev + STAGES):  # the loader needs slot `prev` back before this step lands
            acc = warpgroup_mma(p16, v_ring.index(prev % STAGES).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(empty.index(prev % STAGES))
            pending = 0
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        if (own_a | own_b) != 0:
            k_tile = k_ring.index(slot).reshape([BLOCK_N, HEAD_DIM])
            if pending != 0:
                s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                acc = warpgroup_mma(p16, v_ring.index(prev % STAGES).reshape([BLOCK_N, HEAD_DIM]), acc,
                                    is_async=True)  # fmt: skip
                s = warpgroup_mma_wait(1, deps=[s])  # the scores (issued first) are in; P V may still run
                if masked:
                    s = _union_mask(s, ua, ub, own_a, own_b, pos_s, cols_s, BLOCK_N)
                p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
                acc = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(empty.index(prev % STAGES))
            else:  # nothing pending: the scores alone
                s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), s_zero, use_acc=False)
                if masked:
                    s = _union_mask(s, ua, ub, own_a, own_b, pos_s, cols_s, BLOCK_N)
                p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p16 = gl.convert_layout(p.to(q_smem.dtype), p_layout)
            pending = 1
            prev = step
        else:  # the other warpgroup's blocks only: free the slot (its copy landed)
            mbarrier.arrive(empty.index(slot))
        n += 1
    mbarrier.arrive(q_empty)  # every score of the tile is in: the loader may bring the next tile's Q
    if pending != 0:  # the last own step's P V
        acc = warpgroup_mma(p16, v_ring.index(prev % STAGES).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index(prev % STAGES))
    _store_rows(acc, m_i, l_i, 0, qb * 64, head, T, Out, Lse, stride_oh, stride_ot, stride_lh, 64, HEAD_DIM, STORE_LSE,
                s_layout, o_layout)  # fmt: skip
    return n


@gluon.jit
def _union_mask(s, ua, ub, own_a, own_b, pos_s, cols_s, BLOCK_N: gl.constexpr):
    """A union step's scores ``s`` [64, BLOCK_N] with the keys past each row's position, and (128-key steps) the half
    whose block is not in the row's list, set to ``-inf``."""
    keep = _slot_keys(ua, ub, cols_s, BLOCK_N)[None, :] <= pos_s[:, None]
    if BLOCK_N == 128:
        keep = keep & (gl.where(cols_s < 64, own_a, own_b) != 0)[None, :]
    return gl.where(keep, s, float("-inf"))


@gluon.jit
def _math_union(q_smem, k_ring, v_ring, q_ready, q_empty, ready, empty, LNum, LIdx, CuSeq, qk_scale, Out, Lse,
                stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, stride_ob, stride_oh, stride_ot, stride_lb,
                stride_lh, T, NQ, HQ, num_tiles, WG: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                STORE_LSE: gl.constexpr, BLOCK_N: gl.constexpr, VARLEN: gl.constexpr):  # fmt: skip
    """A math warpgroup of the per-query-head union kernel: query block ``qblk + WG`` of each of the program's tiles
    (those past their sequence's end skipped)."""
    it = 0
    use = 0
    for rnd in range(gl.cdiv(num_tiles, gl.num_programs(0))):
        tile = _program_tile(rnd)
        if tile < num_tiles:
            b, h, qblk = _union_tile(tile, NQ, HQ)
            bt, t0, seqlen = _sequence(CuSeq, b, T, VARLEN)
            if qblk * 64 < seqlen:
                list0, cnt0, list1, cnt1 = _pair_lists(LNum, LIdx, b, h, qblk, NQ, seqlen, stride_nb, stride_nh,
                                                       stride_ib, stride_ih, stride_iq)  # fmt: skip
                mbarrier.wait(q_ready, use & 1)
                out = Out + bt.to(gl.int64) * stride_ob + t0.to(gl.int64) * stride_ot
                lse = Lse + bt.to(gl.int64) * stride_lb + t0
                it += _attend_union(q_smem, k_ring, v_ring, ready, empty, q_empty, list0, cnt0, list1, cnt1, it,
                                    qblk + WG, h, seqlen, qk_scale, out, lse, stride_oh, stride_ot, stride_lh, WG,
                                    HEAD_DIM, STAGES, STORE_LSE, BLOCK_N)  # fmt: skip
                use += 1


@gluon.jit
def _sparse_fwd_ws_union_kernel(
    q_desc, k_desc, v_desc, Out, Lse, LNum, LIdx, CuSeq, qk_scale,
    stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
    T, HQ, NQ, GROUP, num_tiles,
    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr, BLOCK_N: gl.constexpr,
    VARLEN: gl.constexpr,
):  # fmt: skip
    """Per-query-head masks at 64-token blocks, persistent: a tile is two consecutive query blocks of one head (a math
    warpgroup each, its own list) over one ring that holds each block of the union of the two lists once, one or two
    a slot (``BLOCK_N`` 64 / 128 keys; a warpgroup skips the slots without its blocks and masks off the other's half
    of a 128-key slot); one loader warp."""
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    q4 = gl.allocate_shared_memory(q_desc.dtype, [1, 1, 128, HEAD_DIM], smem)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], smem)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], smem)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both math warpgroups free a slot (one of them perhaps unread)
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    q2 = q4.reshape([128, HEAD_DIM])
    gl.warp_specialize(
        [(_math_union, (q2.slice(0, 64), k_ring, v_ring, q_ready.index(0), q_empty.index(0), ready, empty, LNum, LIdx,
                        CuSeq, qk_scale, Out, Lse, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, stride_ob,
                        stride_oh, stride_ot, stride_lb, stride_lh, T, NQ, HQ, num_tiles, 0, HEAD_DIM, STAGES,
                        STORE_LSE, BLOCK_N, VARLEN)),
         (_math_union, (q2.slice(64, 64), k_ring, v_ring, q_ready.index(1), q_empty.index(1), ready, empty, LNum,
                        LIdx, CuSeq, qk_scale, Out, Lse, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
                        stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, T, NQ, HQ, num_tiles, 1, HEAD_DIM,
                        STAGES, STORE_LSE, BLOCK_N, VARLEN)),
         (_loader_union, (q_desc, k_desc, v_desc, q4, k_ring, v_ring, q_ready, q_empty, ready, empty, LNum, LIdx,
                          CuSeq, stride_nb, stride_nh, stride_ib, stride_ih, stride_iq, T, NQ, HQ, GROUP, num_tiles,
                          STAGES, BLOCK_N, VARLEN))],
        [4, 1], [232, 24],
    )  # fmt: skip


def _descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """A TMA descriptor of ``x`` [B, H, T, D] (any strides TMA takes) with ``[1, 1, rows, D]`` boxes."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, x.shape[3]], layout)


def launch(
    q, k, v, out, lse, kv_num_blocks, kv_indices, scale: float, mask_block: int = 64, block_n: int = 64,
    programs: int | None = None, cu_seqlens: torch.Tensor | None = None, union: bool = False,
) -> None:  # fmt: skip
    """Run the kernel (the case checked by :func:`supported`): out [B, Hq, T, D] (``[B, T, Hq, D]`` memory), lse
    [B, Hq, T] fp32 or None; lists int32 [B, H, NQ(, NK)] of ``mask_block``-token blocks, H = Hq (per query head) or
    Hkv (per group). ``block_n``: keys a step, 64 (a kept 64-token block) or 128 (two kept 64-token blocks, or one
    128-token block; per-group masks only). Persistent: ``programs`` (None: one a multiprocessor, at most one a tile)
    each walk their share of the tiles; any count gives the same result, bit for bit. Varlen: ``cu_seqlens`` int32
    [N + 1], B == 1, the lists' batch N (each sequence the top-left corner of its mask, as :mod:`.sparse_fwd`).
    ``union``: per-query-head masks at 64-token blocks on the union kernel (two query blocks of one head a tile,
    each kept block copied once for both; ``block_n`` 64, or 128: two blocks of the union a step) instead of the
    head-pair one (one query block of two heads a tile)."""
    t, d = q.shape[2], q.shape[3]
    hq, hkv = q.shape[1], k.shape[1]
    b, hm, nq = kv_indices.shape[:3]  # b: sequences (the batch, or varlen's N)
    group = hq // hkv
    per_head = hm == hq and mask_block == 64  # the per-query-head kernel; at 128-token blocks the per-group one
    if (mask_block, block_n) not in STEPS or (per_head and block_n != 64 and not union):
        kind = "per-query-head" if hm == hq else "per-group"
        raise ValueError(
            f"sparse_fwd_ws.launch: (mask_block, block_n) must be one of {STEPS} (block_n 128 with per-group masks, "
            f"128-token blocks or union=True only), got ({mask_block}, {block_n}) with {kind} masks"
        )
    if union and not per_head:
        raise ValueError("sparse_fwd_ws.launch: union=True takes per-query-head masks at 64-token blocks only")
    lse_arg = lse if lse is not None else out  # never written without STORE_LSE
    if union:  # a tile: two consecutive 64-token query blocks of one head
        kernel, tiles, q_rows = _sparse_fwd_ws_union_kernel, b * hq * ((nq + 1) // 2), 64
        extra, consts = (hq, nq, group), dict(STAGES=stages(block_n), BLOCK_N=block_n)
    elif per_head:  # a tile: two heads' 64-token query block
        kernel, tiles, q_rows = _sparse_fwd_ws_heads_kernel, b * (hq // 2) * nq, 64
        extra, consts = (hq, nq, group), dict(STAGES=STAGES_HEADS)
    else:  # a tile: the G = Hq / Hm heads of a mask, 128 / G positions; one head: two 64-row Q boxes
        g = hq // hm
        kernel, tiles, q_rows = _sparse_fwd_ws_kernel, b * hm * nq * (g * mask_block // 128), min(128 // g, 64)
        extra, consts = (hm, nq, group), dict(G=g, STAGES=stages(block_n), MB=mask_block, BLOCK_N=block_n)
    if programs is None:
        programs = min(tiles, num_sms(q.device))  # one a multiprocessor: the three partitions take its registers
    elif programs < 1:
        raise ValueError(f"sparse_fwd_ws.launch: programs must be None or >= 1, got {programs}")
    varlen = cu_seqlens is not None
    kernel[(programs,)](
        _descriptor(q, q_rows), _descriptor(k, 64), _descriptor(v, 64), out, lse_arg, kv_num_blocks, kv_indices,
        cu_seqlens if varlen else kv_num_blocks, scale * LOG2E, out.stride(0), out.stride(1), out.stride(2),
        lse_arg.stride(0), lse_arg.stride(1), kv_num_blocks.stride(0), kv_num_blocks.stride(1), kv_indices.stride(0),
        kv_indices.stride(1), kv_indices.stride(2), t, *extra, tiles, HEAD_DIM=d, STORE_LSE=lse is not None,
        VARLEN=varlen, num_warps=4, **consts,
    )  # fmt: skip
