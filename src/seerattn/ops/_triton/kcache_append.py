"""One decode step's append to the decode-gate key cache (:meth:`seerattn.gate.GateKeyCache.append`) in two
Triton launches; and, at the end, one step's update of the blocks' key bounds (:meth:`seerattn.gate.BlockBounds.update`,
``DecodePolicy.bound_slots``) in one: each sequence's last completed block, re-read from the KV cache.

What it replaces: the eager append updates the running max / min / sum pools of every sequence's partial block
and, in every step, computes a gate key for every sequence (pool finish, projection einsum, RMSNorm, RoPE) only
to keep it where the new row completes the block (``torch.where`` + scatter): about 31 small torch launches per
layer and step (torch.profiler on the CPU: copy_ 18, mul 12, add 6, cat 4, eq 4, ...). In a decode step replayed
from a CUDA graph those launches, not their work, are the cost.

Algorithm
---------
``_append_kernel``: one program per (sequence ``b``, KV head ``h``).

1. ``count = lengths[b] % BLOCK_SIZE`` rows are already in the partial block; with ``count == 0`` the pools
   start afresh (-inf for max, +inf for min, 0 for the sum). The new row ``k_new[b, h]`` (in fp32, the pools'
   dtype) is folded into each pooling and the pools are written back.
2. Only where ``count + 1 == BLOCK_SIZE`` (a scalar branch: the other programs stop here, reading no weights):
   the pooled vector (the ``pool_blocks`` layout, avg = sum / BLOCK_SIZE; read back from the pools just written,
   ``_CHUNK`` channels at a time), rounded to the gate's dtype as the eager einsum's input is, times ``k_proj[h]``
   ``[Ck * D, Dg]`` into two fp32 accumulators, one per half of the gate dimension (as the prefill's
   ``_project_kernel``: the rotation pairs channel ``j`` with ``j + Dg / 2`` in registers); the product
   rounded to the gate's dtype (the einsum's output); RMSNorm over Dg
   (``x * rsqrt(mean(x^2) + eps) * weight``, torch.nn.RMSNorm) rounded again; with ``ROPE`` rotate-half
   (:func:`seerattn.gate.attn_gate.apply_rotary`) with the cos/sin row of the block's first position, both cast
   to the gate's dtype first (``DecodeGate._rope``); this epilogue is :func:`.gate_epilogue.norm_rope_halves`,
   shared with the gate query's kernel (:mod:`.gate_query`). The key is written at slot ``min(num_blocks[b],
   capacity - 1)``, the eager append's clamp.

``_count_kernel``: ``num_blocks[b] += (lengths[b] % BLOCK_SIZE == BLOCK_SIZE - 1)``, ``lengths[b] += 1``. A
separate launch because every head's program of a sequence reads the counters: updated inside the first
kernel, a program that ran after another head's update would read the new counts (a race).

No host synchronisation, no data-dependent shape: the step stays capturable in a CUDA graph. The cos/sin rows
come from the model's rotary, called before the kernel by the caller (its own launches).

Supported: k_new in fp16, bf16 or fp32 (bf16 not under the interpreter), any strides with a unit last one; a gate
(``k_proj``, ``keys``, the norm weight) in fp16, bf16 or fp32; fp32 pools; even Dg; any D. The arithmetic is fp32,
so an fp32 gate matches the eager append to rounding (summation order of the projection); a bf16 / fp16 gate
rounds at the eager path's main steps but not at every one of its ops. Offline sm_90a compile (Triton 3.6, D = Dg
= 128, 3 poolings, RoPE, 4 warps): 64 registers, no spills. On the H200 (tree 23b61a5) one layer's append replayed
from a CUDA graph takes 0.027 ms against 0.100 eager at batch 16 (``python -m benchmarks.kcache_append``;
docs/experiments/decode/session12/README.md, section 3); the tile is not tuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gate_epilogue import norm_rope_halves

__all__ = ["block_bounds_update_fwd", "gate_key_append_fwd"]

_POOL_CODES = {"avg": 0, "max": 1, "min": 2}
_COUNT_BLOCK = 128  # sequences per program of the counter kernel
# Rows of the projection's weights per step ([_CHUNK, Dg / 2] tiles, two of them): no spills at D = Dg = 128 with
# 4 warps (offline sm_90 compile, Triton 3.6); not tuned.
_CHUNK = 32


@triton.jit
def _fold_pool(code: tl.constexpr, p_ptr, x, d_ok, fresh):
    """One pooling's running value [D_P] at ``p_ptr`` after the row ``x``, written back (the stored value is
    ignored when the block starts afresh)."""
    cur = tl.load(p_ptr, mask=d_ok, other=0.0)
    if code == 0:
        new = tl.where(fresh, 0.0, cur) + x
    elif code == 1:
        new = tl.maximum(tl.where(fresh, float("-inf"), cur), x)
    else:
        new = tl.minimum(tl.where(fresh, float("inf"), cur), x)
    tl.store(p_ptr, new, mask=d_ok)


@triton.jit
def _project_pool(
    acc1, acc2, code: tl.constexpr, p_ptr, w_ptr, stride_wc,
    D: tl.constexpr, BLOCK_C: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """Adds one pooling's finished channels (read back from its pools at ``p_ptr``) times its ``D`` rows of the
    weights (``w_ptr``: row 0, column 0) to the two half accumulators [HALF_P], ``BLOCK_C`` rows at a time."""
    wdt = w_ptr.dtype.element_ty
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, HALF_P)
    j_ok = offs_j < HALF
    for c0 in tl.range(0, D, BLOCK_C):
        c = c0 + offs_c
        c_ok = c < D
        v = tl.load(p_ptr + c, mask=c_ok, other=0.0)
        if code == 0:
            v = v * (1.0 / BLOCK_SIZE)  # = sum / BLOCK_SIZE exactly (a power of two), as the eager _finish
        v = v.to(wdt).to(tl.float32)[:, None]  # the einsum's input: pooled.to(k_proj.dtype)
        w = w_ptr + c.to(tl.int64)[:, None] * stride_wc + offs_j[None, :]
        m = c_ok[:, None] & j_ok[None, :]
        acc1 += tl.sum(v * tl.load(w, mask=m, other=0.0).to(tl.float32), 0)
        acc2 += tl.sum(v * tl.load(w + HALF, mask=m, other=0.0).to(tl.float32), 0)
    return acc1, acc2


@triton.jit
def _append_kernel(
    K, Pools, Keys, W, NormW, Cos, Sin, Lens, NBlk,
    stride_kb, stride_kh,
    stride_pb, stride_ph, stride_pc,
    stride_yb, stride_yh, stride_yn,
    stride_wh, stride_wc,
    stride_cb, stride_sb,
    H, CAP, eps,
    D: tl.constexpr, D_P: tl.constexpr, BLOCK_C: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NPOOL: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    ROPE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    count = tl.load(Lens + b) % BLOCK_SIZE
    fresh = count == 0
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    x = tl.load(K + b * stride_kb + h * stride_kh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    p_base = Pools + b * stride_pb + h * stride_ph
    _fold_pool(P0, p_base + offs_d, x, d_ok, fresh)
    if NPOOL > 1:
        _fold_pool(P1, p_base + stride_pc + offs_d, x, d_ok, fresh)
    if NPOOL > 2:
        _fold_pool(P2, p_base + 2 * stride_pc + offs_d, x, d_ok, fresh)

    if count == BLOCK_SIZE - 1:  # the row completes the block: its gate key
        # The projection reads the pools back in row chunks (full [D, Dg / 2] weight tiles held the whole pooled
        # vectors in registers: 255 registers and spills at D = Dg = 128, 3 poolings, offline sm_90 compile); the
        # barrier makes the other threads' pool stores visible.
        tl.debug_barrier()
        wdt = W.dtype.element_ty
        offs_j = tl.arange(0, HALF_P)
        j_ok = offs_j < HALF
        acc1 = tl.zeros([HALF_P], dtype=tl.float32)
        acc2 = tl.zeros([HALF_P], dtype=tl.float32)
        w_base = W + h * stride_wh
        acc1, acc2 = _project_pool(acc1, acc2, P0, p_base, w_base, stride_wc, D, BLOCK_C, HALF, HALF_P, BLOCK_SIZE)
        if NPOOL > 1:
            acc1, acc2 = _project_pool(
                acc1, acc2, P1, p_base + stride_pc, w_base + D * stride_wc, stride_wc, D, BLOCK_C, HALF, HALF_P,
                BLOCK_SIZE,
            )  # fmt: skip
        if NPOOL > 2:
            acc1, acc2 = _project_pool(
                acc1, acc2, P2, p_base + 2 * stride_pc, w_base + 2 * D * stride_wc, stride_wc, D, BLOCK_C, HALF,
                HALF_P, BLOCK_SIZE,
            )  # fmt: skip
        o1, o2 = norm_rope_halves(acc1, acc2, NormW, Cos + b * stride_cb, Sin + b * stride_sb, eps, HALF, HALF_P, ROPE)
        slot = tl.minimum(tl.load(NBlk + b), CAP - 1)
        y_base = Keys + b * stride_yb + h * stride_yh + slot * stride_yn + offs_j
        tl.store(y_base, o1.to(wdt), mask=j_ok)
        tl.store(y_base + HALF, o2.to(wdt), mask=j_ok)


@triton.jit
def _count_kernel(Lens, NBlk, B, BLOCK_SIZE: tl.constexpr, BLOCK_B: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    m = offs < B
    n = tl.load(Lens + offs, mask=m, other=0)
    nb = tl.load(NBlk + offs, mask=m, other=0)
    tl.store(NBlk + offs, nb + (n % BLOCK_SIZE == BLOCK_SIZE - 1).to(nb.dtype), mask=m)
    tl.store(Lens + offs, n + 1, mask=m)


def gate_key_append_fwd(
    k_new: torch.Tensor,
    pools: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    num_blocks: torch.Tensor,
    k_proj: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    block_size: int,
    poolings: tuple[str, ...],
) -> None:
    """Launch the two kernels, updating ``pools``, ``keys``, ``lengths`` and ``num_blocks`` in place (inputs
    already validated by the caller: :func:`seerattn.ops.gate_key_append`).

    k_new: [B, Hkv, D] (unit last stride); pools: fp32 [B, Hkv, Ck, D] (unit last stride); keys: [B, Hkv, NB, Dg]
    (unit last stride); lengths, num_blocks: contiguous int64 [B]; k_proj: [Hkv, Ck * D, Dg] (unit last stride);
    norm_weight: contiguous [Dg]; cos, sin: [B, 1, Dg] (unit last stride) or both None (no RoPE).
    """
    b, hkv, nb, dg = keys.shape
    d = k_new.shape[-1]
    codes = [_POOL_CODES[p] for p in poolings] + [0] * (3 - len(poolings))
    rope = cos is not None
    half = dg // 2
    _append_kernel[(b * hkv,)](
        k_new, pools, keys, k_proj, norm_weight, cos if rope else keys, sin if rope else keys, lengths, num_blocks,
        k_new.stride(0), k_new.stride(1),
        pools.stride(0), pools.stride(1), pools.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        k_proj.stride(0), k_proj.stride(1),
        cos.stride(0) if rope else 0, sin.stride(0) if rope else 0,
        hkv, nb, float(eps),
        D=d, D_P=triton.next_power_of_2(d), BLOCK_C=min(_CHUNK, triton.next_power_of_2(d)), HALF=half,
        HALF_P=triton.next_power_of_2(half), BLOCK_SIZE=block_size,
        NPOOL=len(poolings), P0=codes[0], P1=codes[1], P2=codes[2], ROPE=rope,
        num_warps=4,
    )  # fmt: skip
    _count_kernel[(triton.cdiv(b, _COUNT_BLOCK),)](lengths, num_blocks, b, BLOCK_SIZE=block_size, BLOCK_B=_COUNT_BLOCK)


@triton.jit
def _bounds_kernel(
    K, KMIN, KMAX, Lens, Starts,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_bb, stride_bh, stride_bn, stride_bd,
    H, T, NB,
    D: tl.constexpr, D_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    # one program per (sequence, KV head): the min / max of the sequence's last completed block, from the cache
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    n = tl.load(Lens + b)
    last = (n - 1) // BLOCK_SIZE - 1  # -1 (or below, for an empty sequence): no completed block yet
    if last >= 0:
        first = last * BLOCK_SIZE
        if HAS_STARTS:
            first += tl.load(Starts + b)
        rows = tl.minimum(first + tl.arange(0, BLOCK_SIZE), T - 1).to(tl.int64)
        d = tl.arange(0, D_P)
        d_ok = d < D
        x = tl.load(
            K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kt + d[None, :] * stride_kd,
            mask=d_ok[None, :],
            other=0.0,
        )
        slot = tl.minimum(last, NB - 1).to(tl.int64)
        out = b * stride_bb + h * stride_bh + slot * stride_bn + d * stride_bd
        tl.store(KMIN + out, tl.min(x, 0).to(KMIN.dtype.element_ty), mask=d_ok)
        tl.store(KMAX + out, tl.max(x, 0).to(KMAX.dtype.element_ty), mask=d_ok)


def block_bounds_update_fwd(
    key: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    block_size: int,
) -> None:
    """Launch the bounds kernel (inputs validated by the caller: :func:`seerattn.ops.block_bounds_update`): key
    [B, Hkv, T, D]; kmin, kmax [B, Hkv, NB, D] of one stride layout, updated in place; lengths int [B] (contiguous);
    starts int [B] (contiguous) or None."""
    b, hkv, t, d = key.shape
    _bounds_kernel[(b * hkv,)](
        key, kmin, kmax, lengths, lengths if starts is None else starts,
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmin.stride(3),
        hkv, t, kmin.shape[2],
        D=d, D_P=triton.next_power_of_2(d), BLOCK_SIZE=block_size, HAS_STARTS=starts is not None,
    )  # fmt: skip
