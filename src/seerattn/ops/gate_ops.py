"""Fused prefill-gate ops: the gate's block logits and the policy's block selection, in Triton.

Shape legend: B batch, Hq query heads, Hkv key/value heads, H mask heads (Hq or Hkv), T tokens,
D head dim, Dg gate dim, NB = ceil(T / block_size) blocks, NS = ceil(T / q_step) query windows.

Their eager references are the library's eager code, which these ops reproduce and which call
them for ``impl="triton"``: :class:`seerattn.gate.AttnGate`'s forward for :func:`gate_block_logits`
and :func:`seerattn.block_mask.mask_from_scores` for :func:`select_blocks`. Both are inference
ops (no gradients). They run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``
(fp16/fp32 there).
"""

from __future__ import annotations

import functools

import torch

from ..block_mask import BlockMask, SparsityPolicy, density_row_budget, num_blocks, policy_source

__all__ = ["gate_block_logits", "select_blocks"]

_POOLINGS = ("avg", "max", "min")


def gate_block_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    k_proj: torch.Tensor,
    q_proj: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    block_size: int,
    q_step: int,
    q_pooling: tuple[str, ...],
    k_pooling: tuple[str, ...],
    causal_only: bool = False,
) -> torch.Tensor:
    """The AttnGate's block logits without the eager gate's intermediates (a Triton pooling kernel
    per input, a Triton projection kernel per input that applies RoPE to the gate vectors as it writes them,
    a Triton scores kernel with the log-sum-exp over query windows and the causal block mask), computed in fp32.

    Args:
        q: [B, Hq, T, D] pre-RoPE queries; k: [B, Hkv, T, D] pre-RoPE keys (views are read in place).
        k_proj: [Hq, len(k_pooling) * D, Dg]; q_proj: [Hq, len(q_pooling) * D, Dg] or None (then
            one Q pooling and Dg == D: the pooled Q is the gate query).
        cos, sin: [B or 1, NS, Dg] rotary tables at each query window's first position (key blocks
            use every ``block_size // q_step``-th), or both None for a gate without RoPE.
        block_size: tokens per block; q_step: tokens per query window (a power of two dividing it).
        q_pooling, k_pooling: pooling functions (``avg``/``max``/``min``) concatenated on channels.
        causal_only: leave the entries above the block diagonal unwritten (unspecified), for a consumer that reads
            only the causal part (the policies do): at 128k a quarter of a GB of writes a layer less.

    Returns:
        logits [B, Hq, NB, NB] fp32, ``-inf`` above the block diagonal (unspecified with ``causal_only``).
    """
    from ._triton import SUPPORTED_HEAD_DIMS
    from ._triton.config import check_device

    op = "gate_block_logits"
    float_types = (torch.float16, torch.bfloat16, torch.float32)
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D tensor [B, H, T, D]")
        check_device(x, op, float_types)
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or hkv < 1 or hq % hkv:
        raise ValueError(f"{op}: k {tuple(k.shape)} does not match q {tuple(q.shape)} (same B, T, D; Hq % Hkv == 0)")
    if d not in SUPPORTED_HEAD_DIMS or t < 1:
        raise ValueError(f"{op}: head dim must be one of {SUPPORTED_HEAD_DIMS} and T >= 1, got D={d}, T={t}")
    if q_step < 1 or q_step & (q_step - 1) or block_size % q_step:
        raise ValueError(f"{op}: q_step must be a power of two dividing block_size={block_size}, got {q_step}")
    for name, pools in (("q_pooling", q_pooling), ("k_pooling", k_pooling)):
        if not pools or len(pools) > 3 or any(p not in _POOLINGS for p in pools):
            raise ValueError(f"{op}: {name} must be 1-3 of {_POOLINGS}, got {pools!r}")
    dg = k_proj.shape[-1]
    if k_proj.shape != (hq, len(k_pooling) * d, dg) or dg < 2 or dg % 2:
        raise ValueError(f"{op}: k_proj must be [Hq={hq}, {len(k_pooling)}*D={len(k_pooling) * d}, even Dg], got "
                         f"{tuple(k_proj.shape)}")  # fmt: skip
    if q_proj is None and (len(q_pooling) != 1 or dg != d):
        raise ValueError(f"{op}: without q_proj, Q needs one pooling and Dg == D, got {q_pooling}, Dg={dg}")
    if q_proj is not None and q_proj.shape != (hq, len(q_pooling) * d, dg):
        raise ValueError(f"{op}: q_proj must be [{hq}, {len(q_pooling) * d}, {dg}], got {tuple(q_proj.shape)}")
    ns = num_blocks(t, q_step)
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: give both cos and sin (RoPE) or neither")
    if cos is not None and (cos.shape != sin.shape or cos.shape[1:] != (ns, dg) or cos.shape[0] not in (1, b)):
        raise ValueError(f"{op}: cos/sin must be [B={b} or 1, NS={ns}, Dg={dg}], got {tuple(cos.shape)}")
    weights = [w for w in (k_proj, q_proj) if w is not None]
    if any(w.device != q.device for w in weights + [k] + ([cos, sin] if cos is not None else [])):
        raise ValueError(f"{op}: every tensor must be on {q.device}")
    if not isinstance(causal_only, bool):
        raise TypeError(f"{op}: causal_only must be True or False, got {causal_only!r}")
    from ._triton.gate_fwd import gate_logits_fwd

    q, k, k_proj = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, k_proj))
    if q_proj is not None and q_proj.stride(-1) != 1:
        q_proj = q_proj.contiguous()
    if cos is not None:
        cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (cos, sin))
    return gate_logits_fwd(
        q, k, k_proj, q_proj, cos, sin, block_size, q_step, tuple(q_pooling), tuple(k_pooling), causal_only=causal_only
    )


@functools.lru_cache(maxsize=64)
def _device_row_budget(nq: int, density: float, allocation: str, device: torch.device) -> torch.Tensor:
    return density_row_budget(nq, density, device, allocation)


def _row_budget(nq: int, density: float, allocation: str, device: torch.device) -> torch.Tensor:
    """:func:`density_row_budget` on ``device``, made once per (NQ, density, allocation, device) and read (never
    written) by every later selection: a layer's policy then launches the selection kernel alone (five small
    launches a layer before). Inside a CUDA graph capture it is made afresh: a tensor made there holds its values
    only once the graph is replayed, so it must not be kept for eager calls."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return density_row_budget(nq, density, device, allocation)
    return _device_row_budget(nq, density, allocation, device)


def select_blocks(scores: torch.Tensor, policy: SparsityPolicy, seq_len: int, block_size: int) -> BlockMask:
    """:func:`seerattn.block_mask.mask_from_scores` in one Triton kernel (no sort): the same blocks,
    the same tie rule (equal scores: the lower column), written as ``BlockMask`` lists directly.

    scores: [B, H, NQ, NQ] (inputs validated by ``mask_from_scores``; fp16/bf16/fp32 ranked in fp32,
    fp64 in fp64). ``allocation="head"`` adds a radix select of each head's budget-th score (a few
    small launches before the selection kernel).
    """
    from ._triton.config import check_device

    op = "select_blocks"
    check_device(scores, op, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    nq = scores.shape[-1]
    budget = head_total = None
    if policy.kind == "density" and policy.allocation == "head":
        head_total = round(policy.value * nq * (nq + 1) / 2)
    elif policy.kind == "density":
        budget = _row_budget(nq, policy.value, policy.allocation, scores.device)
    from ._triton.select import select_fwd

    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    num, idx = select_fwd(
        scores, policy.kind, policy.value, budget, policy.keep_sink, policy.keep_diagonal, policy.dense_last_rows,
        head_total,
    )  # fmt: skip
    return BlockMask(num, idx, block_size, seq_len, source=policy_source(policy))
