"""The decode gate's per-step query as one validated op (:func:`gate_decode_query`).

Its eager reference is :meth:`seerattn.gate.DecodeGate.decode_query` with ``query_impl="eager"``, which calls this
op for ``"triton"`` (the default on CUDA). Shape legend: B sequences, Hq / Hkv query / key-value heads,
G = Hq / Hkv, D head dim, Dg gate dim.
"""

from __future__ import annotations

import torch

__all__ = ["gate_decode_query"]


def gate_decode_query(
    q: torch.Tensor,
    q_proj: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> torch.Tensor:
    """The decode gate's query of one new token per sequence in one Triton launch
    (:mod:`seerattn.ops._triton.gate_query`): what the eager :meth:`~seerattn.gate.DecodeGate.decode_query` returns.

    Per sequence b and KV head h: the group's pre-RoPE query heads ``q[b, h * G : (h + 1) * G]`` concatenated
    (G * D channels) in the gate's dtype, projected by ``q_proj[h]``, RMS-normed (``norm_weight``, ``eps``) and
    rotated rotate-half style with the ``cos`` / ``sin`` row of the token's position.

    Args:
        q: [B, Hq, D] fp16 / bf16 / fp32 pre-RoPE queries.
        q_proj: [Hkv, G * D, Dg] the gate's query projection (fp16 / bf16 / fp32): its dtype is the gate's.
        norm_weight: [Dg] the query RMSNorm's weight, in the gate's dtype; eps: its epsilon (> 0).
        cos, sin: [B, 1, Dg] the rotary tables at each token's position (any floating dtype: cast to the gate's,
            as ``DecodeGate._rope`` does), or both None for a gate without RoPE.

    Returns:
        [B, Hkv, Dg] gate queries in the gate's dtype (a new tensor).

    Triton only (CUDA, or CPU under ``TRITON_INTERPRET=1``); no host synchronisation (capturable in a CUDA graph);
    no backward (inference: call it without gradients). Dg must be even (the kernel works on the two halves of
    the gate dimension, RoPE's rotate-half pairs).
    """
    op = "gate_decode_query"
    from ._triton.config import check_device, check_shapes_and_devices

    tensors = {"q": q, "q_proj": q_proj, "norm_weight": norm_weight}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: give both cos and sin (RoPE) or neither")
    if q_proj.dim() != 3 or 0 in q_proj.shape:
        raise ValueError(f"{op}: q_proj must be a non-empty [Hkv, G * D, Dg], got shape {tuple(q_proj.shape)}")
    hkv, gd, dg = q_proj.shape
    if q.dim() != 3 or 0 in q.shape:
        raise ValueError(f"{op}: q must be a non-empty [B, Hq, D], got shape {tuple(q.shape)}")
    b, hq, d = q.shape
    if hq % hkv or hq // hkv * d != gd:
        raise ValueError(
            f"{op}: q [B, Hq={hq}, D={d}] does not fit q_proj [Hkv={hkv}, G * D={gd}, Dg={dg}]: it needs Hq = G * Hkv "
            f"with G * D = {gd}"
        )
    if dg % 2:
        raise ValueError(f"{op}: the gate dim Dg must be even (two halves: RoPE pairs), got {dg}")
    shapes = {"norm_weight": (norm_weight, (dg,), "[Dg]")}
    check_shapes_and_devices(op, shapes, tensors, "q", "q is", cos, sin, b, dg)
    floats = (torch.float16, torch.bfloat16, torch.float32)
    for name in ("q", "q_proj"):
        check_device(tensors[name], op, floats)
    if norm_weight.dtype != q_proj.dtype:
        raise TypeError(f"{op}: norm_weight must be in the gate's dtype (q_proj's, {q_proj.dtype}), got "
                        f"{norm_weight.dtype}")  # fmt: skip
    if cos is not None and not (cos.is_floating_point() and sin.is_floating_point()):
        raise TypeError(f"{op}: cos and sin must be floating point, got {cos.dtype}, {sin.dtype}")
    if not isinstance(eps, float) or not eps > 0:
        raise ValueError(f"{op}: eps must be a float > 0 (the RMSNorm's epsilon), got {eps!r}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors.values()):
        raise RuntimeError(
            f"{op}: the Triton gate query has no backward; call it under torch.no_grad() (inference) or use "
            "DecodeGate's eager query (query_impl='eager') for gradients"
        )
    from ._triton.gate_query import gate_decode_query_fwd

    q, q_proj = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, q_proj))
    norm_weight = norm_weight.contiguous()
    if cos is not None:
        cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (cos, sin))
    return gate_decode_query_fwd(q, q_proj, norm_weight, eps, cos, sin)
