"""One decode step's gate query (:meth:`seerattn.gate.DecodeGate.decode_query`) in one Triton launch.

What it replaces: the eager query casts q to the gate's dtype, concatenates each KV group's query heads (view,
permute, reshape: a copy), projects them (einsum with ``q_proj`` [Hkv, G * D, Dg]), RMS-normalises the result
(torch.nn.RMSNorm) and rotates it at the token's position (:func:`seerattn.gate.attn_gate.apply_rotary`: chunk,
neg, cat, two products, a sum, besides the casts of cos / sin): about a dozen small launches per layer and decode
step besides the rotary's own. In a step replayed from a CUDA graph those launches, not their work, are the cost.

Algorithm
---------
``_query_kernel``: one program per (sequence ``b``, KV head ``h``). The group's concatenated query row (channel
``c = g * D + d`` is ``q[b, h * G + g, d]``, the eager concatenation's order, read in place through q's strides),
rounded to the gate's dtype as the eager einsum's input is, times ``q_proj[h]`` [G * D, Dg], ``_CHUNK`` rows of
the weights at a time, into two fp32 accumulators, one per half of the gate dimension (RoPE's rotate-half pairs
stay in one thread's registers); then :func:`.gate_epilogue.norm_rope_halves` (the einsum's output rounding,
RMSNorm, RoPE with the cos / sin row of the token's position: the key-cache append's own epilogue), stored in
the gate's dtype.

No host synchronisation, no data-dependent shape: capturable in a CUDA graph. The cos / sin rows come from the
model's rotary (or a :class:`~seerattn.gate.RotaryTable`: two gathers), called before the kernel by the caller.

Supported: q in fp16, bf16 or fp32 (bf16 not under the interpreter), any strides with a unit last one; a gate
(``q_proj``, the norm weight, the output) in fp16, bf16 or fp32; even Dg; any D and G. The arithmetic is fp32,
so an fp32 gate matches the eager query to rounding (the projection's summation order); a bf16 / fp16 gate rounds
at the eager path's main steps but not at every one of its ops. The weights are read once per (sequence, head):
at batch B, ``B * Hkv * G * D * Dg`` weight elements come from L2 (the tile is not tuned; a program per (head,
batch tile) with ``tl.dot`` would read them once per tile). Offline sm_90a compile (Triton 3.6, G 4, D = Dg = 128,
4 warps; docs/experiments/decode/session12/gate_query_compile.py): 48 registers (fp32 gate) / 56 (bf16, RoPE), no
spills. Not run nor timed on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gate_epilogue import norm_rope_halves

__all__ = ["gate_decode_query_fwd"]

# Rows of the projection's weights per step ([_CHUNK, Dg / 2] tiles, two of them): the key-cache append's chunk
# (no spills there at D = Dg = 128 with 4 warps, offline sm_90 compile); not tuned for this kernel.
_CHUNK = 32


@triton.jit
def _query_kernel(
    Q, W, NormW, Cos, Sin, Out,
    stride_qb, stride_qh,
    stride_wh, stride_wc,
    stride_cb, stride_sb,
    stride_ob, stride_oh,
    H, eps,
    G: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    ROPE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    wdt = W.dtype.element_ty
    q_base = Q + b * stride_qb + h * G * stride_qh  # the group's first query head
    w_base = W + h * stride_wh
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, HALF_P)
    j_ok = offs_j < HALF
    acc1 = tl.zeros([HALF_P], dtype=tl.float32)
    acc2 = tl.zeros([HALF_P], dtype=tl.float32)
    for c0 in tl.range(0, G * D, BLOCK_C):
        c = c0 + offs_c
        c_ok = c < G * D
        g = c // D  # the concatenated channel's head in the group and its dimension
        v = tl.load(q_base + g.to(tl.int64) * stride_qh + (c - g * D), mask=c_ok, other=0.0)
        v = v.to(wdt).to(tl.float32)[:, None]  # the einsum's input: q.to(q_proj.dtype)
        w = w_base + c.to(tl.int64)[:, None] * stride_wc + offs_j[None, :]
        m = c_ok[:, None] & j_ok[None, :]
        acc1 += tl.sum(v * tl.load(w, mask=m, other=0.0).to(tl.float32), 0)
        acc2 += tl.sum(v * tl.load(w + HALF, mask=m, other=0.0).to(tl.float32), 0)
    o1, o2 = norm_rope_halves(acc1, acc2, NormW, Cos + b * stride_cb, Sin + b * stride_sb, eps, HALF, HALF_P, ROPE)
    o_base = Out + b * stride_ob + h * stride_oh + offs_j
    tl.store(o_base, o1.to(wdt), mask=j_ok)
    tl.store(o_base + HALF, o2.to(wdt), mask=j_ok)


def gate_decode_query_fwd(
    q: torch.Tensor,
    q_proj: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> torch.Tensor:
    """Launch the kernel; returns the gate queries [B, Hkv, Dg] in ``q_proj``'s dtype (inputs already validated by
    the caller: :func:`seerattn.ops.gate_decode_query`).

    q: [B, Hq, D] (unit last stride); q_proj: [Hkv, G * D, Dg] (unit last stride); norm_weight: contiguous [Dg];
    cos, sin: [B, 1, Dg] (unit last stride) or both None (no RoPE).
    """
    b, hq, d = q.shape
    hkv, _, dg = q_proj.shape
    out = torch.empty(b, hkv, dg, dtype=q_proj.dtype, device=q.device)
    rope = cos is not None
    half = dg // 2
    _query_kernel[(b * hkv,)](
        q, q_proj, norm_weight, cos if rope else out, sin if rope else out, out,
        q.stride(0), q.stride(1),
        q_proj.stride(0), q_proj.stride(1),
        cos.stride(0) if rope else 0, sin.stride(0) if rope else 0,
        out.stride(0), out.stride(1),
        hkv, float(eps),
        G=hq // hkv, D=d, BLOCK_C=min(_CHUNK, triton.next_power_of_2(hq // hkv * d)), HALF=half,
        HALF_P=triton.next_power_of_2(half), ROPE=rope,
        num_warps=4,
    )  # fmt: skip
    return out
