"""Decode-gate logits and the token-budget block selection of a decode step in one Triton kernel; and, at the end,
the Quest bound of each block for ``DecodePolicy.bound_slots`` (:func:`bound_scores_fwd`) and the M best of each row
of scores (:func:`top_fwd`).

What it replaces: :meth:`seerattn.gate.DecodeGate.scores`' logits (``qg . kg / sqrt(Dg)`` over the
completed blocks, ``DecodeGate._logits``) followed by
:func:`seerattn.decode_policy.select_decode_blocks` with a ``"budget"`` policy: about fifteen small
torch launches per layer and step (docs/experiments/decode/README.md, sections 1 and 5), one launch here.

Algorithm
---------
One program per (sequence, KV head). It holds the whole row of ``NB`` block logits in registers
(``NBP = next_power_of_2(NB)`` lanes; 2048 for a 128k cache of 64-token blocks), accumulated over
``DC``-wide chunks of the gate dim (the ``[NBP, DC]`` key tile stays at about 8k elements). Key rows of
blocks that are not completed (``J >= (cache_seqlens[b] - 1) // block_size``) are masked, so their
loads are skipped. Products are summed in fp32 (fp64 when either input is fp64), as ``_logits``
promotes, then divided by ``sqrt(Dg)``.

Selection, without a sort: the priority of a block is ``+inf`` for the forced blocks (the first block
and the current, partial block, when the cache has tokens, and the completed blocks of the optional
``forced`` lists, ``M`` per program: ``DecodePolicy.bound_slots``), its logit for a completed block, and the
block takes no part otherwise (nor does a completed block whose logit is ``-inf``, which the eager
top-K drops too). The ``K``-th largest priority is found exactly by a bitwise search on an
order-preserving integer key of the float (32 or 64 passes of a masked count over the row;
:func:`.select._order_key`): ``theta`` is the largest key with at least ``K`` candidates ``>= theta``.
Blocks above ``theta`` are kept, and of those equal to it the lowest block indices, as many as the
budget has left. Ties therefore go to the lower block index (the eager ``torch.topk`` leaves the
order of equal values unspecified).

Output: int32 ``[B, Hkv, K]``, the kept blocks in *ascending* block order (the eager policy lists them
by priority; :func:`seerattn.ops.sparse_decode_attention` takes any order), then -1 padding. No host
synchronisation, no data-dependent shapes: a decode step stays capturable in a CUDA graph.

NaN logits are not detected (a NaN key compares as the largest or the smallest key, by its sign bit).
Supported: qg / keys in fp16, bf16, fp32 or fp64 (bf16 not under the interpreter), any gate dim,
any strides. Offline sm_90a compile (Triton 3.6, Dg 128, 64-token blocks): 64 registers at NB 2048 (8 warps),
128 at NB 512 (4 warps), no spills. Timed on an H200 (tree fa6dfe5; docs/kernels.md, item 9): faster than the
unfused gate + policy eagerly at batch 16 / 64 x 32k / 128k, slower replayed from a CUDA graph at 64 x 128k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select import _order_key, _unit

__all__ = ["bound_scores_fwd", "decode_budget_select_fwd", "top_fwd"]

# Elements of the [NBP, DC] key tile a program multiplies per step of the gate-dim loop.
_TILE = 8192


@triton.jit
def _decode_budget_select_kernel(
    QG, KG, Lens, Idx, Forced,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ib, stride_ih,
    stride_fb, stride_fh, stride_fm,
    H, NB, K,
    DG: tl.constexpr, DC: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KEY64: tl.constexpr, M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    n = tl.load(Lens + b).to(tl.int32)
    # the current block; -1 for an empty cache (integer division truncates towards zero here)
    cur = tl.where(n > 0, (n - 1) // BLOCK_SIZE, -1)
    cols = tl.arange(0, NBP)
    completed = (cols < cur) & (cols < NB)

    acc_dt = tl.float64 if KEY64 else tl.float32
    acc = tl.zeros([NBP], dtype=acc_dt)
    q_row = QG + b * stride_qb + h * stride_qh
    # int32 offsets within one (sequence, head) row of keys (NB * Dg elements), int64 base: fewer registers
    k_row = KG + b * stride_kb + h * stride_kh
    # a rolled loop: unrolled, every chunk's loads were in flight at once (255 registers and spills, sm_90)
    for d0 in tl.range(0, DG, DC, loop_unroll_factor=1):
        d = d0 + tl.arange(0, DC)
        d_ok = d < DG
        qv = tl.load(q_row + d * stride_qd, mask=d_ok, other=0.0).to(acc_dt)
        k_off = cols[:, None] * stride_kn + d[None, :] * stride_kd
        kv = tl.load(k_row + k_off, mask=completed[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(kv.to(acc_dt) * qv[None, :], 1)
    # correctly rounded, as torch's matmul(...) / sqrt(Dg): fp32 '/' and sqrt are approximate on the GPU
    # (div_rn / sqrt_rn take fp32 only; fp64 '/' and sqrt are IEEE already)
    if KEY64:
        logits = acc / tl.sqrt(tl.full([], DG, acc_dt))
    else:
        logits = tl.math.div_rn(acc, tl.math.sqrt_rn(tl.full([], DG, acc_dt)))

    # first and current block, none for an empty cache (cur = -1): 'cols <= cur' rather than '& (n > 0)', a scalar
    # bool that triton 3.9's interpreter broadcasts to an int32 tensor (which tl.store then refuses as a mask)
    forced = ((cols == 0) | (cols == cur)) & (cols <= cur) & (cols < NB)
    f_row = Forced + b * stride_fb + h * stride_fh
    for m in tl.static_range(M):  # the listed blocks, where completed (-1: none)
        forced = forced | ((cols == tl.load(f_row + m * stride_fm).to(tl.int32)) & completed)
    cand = forced | (completed & (logits != float("-inf")))
    key = _order_key(tl.where(forced, float("inf"), logits), KEY64)
    theta = tl.zeros([], dtype=tl.int32).to(key.dtype)
    for bit in tl.static_range(63 if KEY64 else 31, -1, -1):
        t = theta | (_unit(KEY64) << bit)
        theta = tl.where(tl.sum(((key >= t) & cand).to(tl.int32), 0) >= K, t, theta)
    # fewer than K candidates: theta stays 0, below every candidate's key, and all of them are kept
    above = cand & (key > theta)
    tied = cand & (key == theta)
    need = K - tl.sum(above.to(tl.int32), 0)
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= need))

    out = Idx + b * stride_ib + h * stride_ih
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(out + pos, cols, mask=keep)
    slots = tl.arange(0, KP)
    cnt = tl.sum(keep.to(tl.int32), 0)
    tl.store(out + slots, tl.full([KP], -1, tl.int32), mask=(slots >= cnt) & (slots < K))


def decode_budget_select_fwd(
    qg: torch.Tensor,
    keys: torch.Tensor,
    cache_seqlens: torch.Tensor,
    num_slots: int,
    block_size: int,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel (inputs already validated by the caller).

    qg: [B, Hkv, Dg] gate queries; keys: [B, Hkv, NB, Dg] cached gate keys; cache_seqlens: int [B]
    (the new token included); num_slots: K; block_size: tokens per block; forced: int [B, Hkv, M] blocks kept
    where completed, or None. Returns int32 [B, Hkv, K].
    """
    b, hkv, nb, dg = keys.shape
    key64 = torch.float64 in (qg.dtype, keys.dtype)
    nbp = triton.next_power_of_2(nb)
    dc = max(1, min(triton.next_power_of_2(dg), _TILE // nbp))
    idx = torch.empty(b, hkv, num_slots, dtype=torch.int32, device=keys.device)
    cache_seqlens = cache_seqlens.contiguous()  # the kernel reads Lens[b] unstrided (an expanded view has stride 0)
    m = 0 if forced is None else forced.shape[2]
    f = idx if forced is None else forced  # never read when M = 0
    _decode_budget_select_kernel[(b * hkv,)](
        qg, keys, cache_seqlens, idx, f,
        qg.stride(0), qg.stride(1), qg.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        idx.stride(0), idx.stride(1),
        f.stride(0), f.stride(1), f.stride(2),
        hkv, nb, num_slots,
        DG=dg, DC=dc, NBP=nbp, KP=triton.next_power_of_2(num_slots), BLOCK_SIZE=block_size, KEY64=key64, M=m,
        num_warps=8 if nbp >= 1024 else 4,
    )  # fmt: skip
    return idx


@triton.jit
def _bound_scores_kernel(
    Q, KMIN, KMAX, Lens, S,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_ln,
    stride_sb, stride_sh, stride_sn,
    H, N, NB,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, CH: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    # one program per (sequence, row, KV head) and chunk of CH blocks
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    n = ((pid // H) % N).to(tl.int64)
    b = (pid // (H * N)).to(tl.int64)
    length = tl.load(Lens + b * stride_lb + n * stride_ln).to(tl.int32)
    cur = tl.where(length > 0, (length - 1) // BLOCK_SIZE, -1)
    j = tl.program_id(1) * CH + tl.arange(0, CH)
    ok = (j >= 1) & (j < cur) & (j < NB)  # completed blocks but the first: the rows the bound ranks
    d = tl.arange(0, DP)
    d_ok = d < D
    k_off = b * stride_kb + h * stride_kh + j[:, None] * stride_kn + d[None, :] * stride_kd
    m = ok[:, None] & d_ok[None, :]
    lo = tl.load(KMIN + k_off, mask=m, other=0.0).to(tl.float32)
    hi = tl.load(KMAX + k_off, mask=m, other=0.0).to(tl.float32)
    best = tl.full([CH], float("-inf"), tl.float32)
    q_row = Q + b * stride_qb + n * stride_qn + d * stride_qd
    for g in tl.static_range(G):  # the group's query heads: the bound of each, then their max
        qv = tl.load(q_row + (h * G + g) * stride_qh, mask=d_ok, other=0.0).to(tl.float32)
        best = tl.maximum(best, tl.sum(tl.maximum(qv[None, :] * lo, qv[None, :] * hi), 1))
    tl.store(S + b * stride_sb + h * stride_sh + n * stride_sn + j, tl.where(ok, best, float("-inf")), mask=j < NB)


def bound_scores_fwd(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lens: torch.Tensor, block_size: int):
    """Launch the bound kernel (inputs validated by the caller): q [B, Hq, N, D], kmin / kmax [B, Hkv, NB, D] of
    one stride layout, lens int [B, N] -> fp32 [B, Hkv, N, NB], -inf outside each row's completed blocks but the
    first."""
    b, hq, n, d = q.shape
    hkv, nb = kmin.shape[1], kmin.shape[2]
    dp = triton.next_power_of_2(d)
    ch = max(1, min(64, _TILE // dp, triton.next_power_of_2(nb)))
    s = torch.empty(b, hkv, n, nb, dtype=torch.float32, device=q.device)
    _bound_scores_kernel[(b * n * hkv, triton.cdiv(nb, ch))](
        q, kmin, kmax, lens, s,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmin.stride(3),
        lens.stride(0), lens.stride(1),
        s.stride(0), s.stride(1), s.stride(2),
        hkv, n, nb,
        G=hq // hkv, D=d, DP=dp, CH=ch, BLOCK_SIZE=block_size,
    )  # fmt: skip
    return s


@triton.jit
def _top_kernel(S, Out, NB, NBP: tl.constexpr, M: tl.constexpr):
    # one program per contiguous row of NB scores: M times the first largest finite entry, then masked out
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, NBP)
    s = tl.load(S + row * NB + cols, mask=cols < NB, other=float("-inf"))
    for m in tl.static_range(M):
        best = tl.max(s, 0)
        at = tl.min(tl.where(s == best, cols, NBP), 0)  # the lowest index of the largest value
        tl.store(Out + row * M + m, tl.where(best == float("-inf"), -1, at))
        s = tl.where(cols == at, float("-inf"), s)


def top_fwd(scores: torch.Tensor, slots: int) -> torch.Tensor:
    """Launch the top-M kernel: scores fp32 [..., NB] contiguous -> int32 [..., M]."""
    nb = scores.shape[-1]
    out = torch.empty(*scores.shape[:-1], slots, dtype=torch.int32, device=scores.device)
    rows = out.numel() // slots
    if rows:
        _top_kernel[(rows,)](scores, out, nb, NBP=triton.next_power_of_2(nb), M=slots, num_warps=8 if nb >= 1024 else 4)
    return out
