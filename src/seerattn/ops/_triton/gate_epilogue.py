"""The end of a decode-gate vector (key or query) that the key-cache append and the gate-query kernels share:
the projection's fp32 accumulators rounded as the eager einsum's output, the RMSNorm, the rotate-half RoPE.

Both kernels hold the projected vector as two halves [HALF_P] (channels ``j`` and ``j + Dg / 2``: RoPE's
rotate-half pairs, so the rotation needs no data movement between threads) and compute in fp32, rounding to the
gate's dtype where the eager path (:class:`seerattn.gate.DecodeGate`) materialises a tensor in it: the einsum's
output, the RMSNorm's normalised input and its output (``x * rsqrt(mean(x^2) + eps)`` then ``* weight``,
torch.nn.RMSNorm), the cos / sin rows (``DecodeGate._rope`` casts them to the gate's dtype). The rotation itself
is one fp32 expression rounded once (the eager ``apply_rotary`` rounds its products and sum separately: equal for
an fp32 gate, within a rounding or two for a bf16 / fp16 one).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["norm_rope_halves"]


@triton.jit
def norm_rope_halves(
    acc1, acc2, NormW, c_ptr, s_ptr, eps, HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr
):
    """(o1, o2) fp32 [HALF_P]: the halves of the finished gate vector (values in the gate's dtype) from
    the projection's fp32 halves ``acc1`` / ``acc2`` (padding lanes 0). ``NormW``: the RMSNorm weight [2 * HALF]
    in the gate's dtype, which it gives; ``c_ptr`` / ``s_ptr``: the cos / sin row [2 * HALF] (unit stride; ignored
    without ``ROPE``)."""
    wdt = NormW.dtype.element_ty
    offs_j = tl.arange(0, HALF_P)
    j_ok = offs_j < HALF
    acc1 = acc1.to(wdt).to(tl.float32)  # the einsum's output dtype
    acc2 = acc2.to(wdt).to(tl.float32)
    ms = (tl.sum(acc1 * acc1, 0) + tl.sum(acc2 * acc2, 0)) / (2 * HALF)
    # correctly rounded, as torch's rsqrt on the CPU (fp32 sqrt and '/' are approximate on the GPU)
    r = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))
    nw1 = tl.load(NormW + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    nw2 = tl.load(NormW + HALF + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    y1 = ((acc1 * r).to(wdt).to(tl.float32) * nw1).to(wdt).to(tl.float32)
    y2 = ((acc2 * r).to(wdt).to(tl.float32) * nw2).to(wdt).to(tl.float32)
    if ROPE:
        cos1 = tl.load(c_ptr + offs_j, mask=j_ok, other=0.0).to(wdt).to(tl.float32)
        cos2 = tl.load(c_ptr + HALF + offs_j, mask=j_ok, other=0.0).to(wdt).to(tl.float32)
        sin1 = tl.load(s_ptr + offs_j, mask=j_ok, other=0.0).to(wdt).to(tl.float32)
        sin2 = tl.load(s_ptr + HALF + offs_j, mask=j_ok, other=0.0).to(wdt).to(tl.float32)
        o1 = y1 * cos1 - y2 * sin1
        o2 = y2 * cos2 + y1 * sin2
    else:
        o1 = y1
        o2 = y2
    return o1, o2
