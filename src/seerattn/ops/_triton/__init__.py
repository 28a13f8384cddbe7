"""Triton kernels behind ``impl="triton"`` (imported on first use; ``import seerattn`` never imports
triton).

- :func:`attention_with_block_scores`: causal FlashAttention forward that also returns the
  ground-truth block scores (:mod:`.block_scores`).
- :func:`block_sparse_attention`: block-sparse causal attention over lists of kept blocks, forward
  (:mod:`.sparse_fwd`) and, when gradients are required, backward (:mod:`.sparse_bwd`), joined by
  one ``torch.autograd.Function``.

Both have the contract of their :mod:`seerattn.ops.reference` counterparts; the public wrappers in
:mod:`seerattn.ops` validate shapes first. Shape legend: B batch, Hq/Hkv query/key-value heads,
T tokens, D head dim, NB = ceil(T / block_size).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (fp32/fp16 only there: bf16 is
silently wrong in the interpreter, so it is refused).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

from ...block_mask import BlockMask
from .block_scores import attention_with_block_scores_fwd
from .config import KernelConfig, check_device
from .sparse_bwd import block_sparse_attention_bwd
from .sparse_fwd import block_sparse_attention_fwd

__all__ = ["KernelConfig", "attention_with_block_scores", "block_sparse_attention"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, op: str):
    """Device, dtype, head dim and block size checks specific to the kernels; returns q, k, v with a
    unit last stride (a copy only for inputs whose last dimension is strided)."""
    check_device(q, op, (torch.float16, torch.bfloat16, torch.float32))
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(f"{op} (triton): head dim {d} not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise NotImplementedError(
            f"{op} (triton): block size {block_size} not supported; supported: {SUPPORTED_BLOCK_SIZES}"
        )
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))


def _scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention_with_block_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 64, scale: float | None = None
):
    """Causal attention plus SeerAttention's ground truth, in one FlashAttention pass.

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] -> (out [B, Hq, T, D] ([B, T, Hq, D] in memory), lse [B, Hq, T] fp32,
    block_scores [B, Hq, NB, NB] fp32: block max of the causal softmax map, rows summing to 1,
    zero above the diagonal).
    """
    q, k, v = _check(q, k, v, block_size, "attention_with_block_scores")
    if _needs_grad(q, k, v):
        raise NotImplementedError(
            "attention_with_block_scores (triton) has no backward: call it under torch.no_grad() or on "
            "detached inputs (it computes the gate's training target), or use impl='reference' for gradients"
        )
    out, lse, scores = attention_with_block_scores_fwd(q, k, v, block_size, _scale(q.shape[-1], scale))
    return out, lse, scores


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


class _BlockSparseAttention(torch.autograd.Function):
    """Forward kernel + backward kernels. ``lse`` is an output but not differentiable (the backward
    takes no gradient through it)."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask: BlockMask, scale: float, cu_seqlens):
        out, lse = block_sparse_attention_fwd(
            q, k, v, block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.block_size, scale,
            cu_seqlens=cu_seqlens, return_lse=True, mask_source=block_mask.source, mask_memo=block_mask.memo,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_mask, ctx.scale, ctx.cu_seqlens = block_mask, scale, cu_seqlens
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable themselves (no double backward)
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        m = ctx.block_mask
        # named ranges for torch.profiler (benchmarks/train_step.py --profile); free when none runs
        with record_function("seer.mask_transpose"):
            q_num_blocks, q_indices = m.q_num_blocks, m.q_indices  # built once per mask, then cached
        with record_function("seer.attention_backward"):
            dq, dk, dv = block_sparse_attention_bwd(
                q, k, v, out, lse, dout, m.kv_num_blocks, m.kv_indices, q_num_blocks, q_indices,
                m.block_size, ctx.scale, cu_seqlens=ctx.cu_seqlens, mask_source=m.source, mask_memo=m.memo,
            )  # fmt: skip
        return dq, dk, dv, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    return_lse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Causal attention on the kept blocks of ``block_mask`` (Hq or Hkv mask heads), differentiable
    in q, k, v (the backward walks the mask's transposed lists, built once and cached on it).

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (varlen: B == 1 and ``cu_seqlens`` int32 [N + 1]) ->
    out [B, Hq, T, D] ([B, T, Hq, D] in memory, like SDPA's flash backends; zeros on rows with no kept
    key), and lse [B, Hq, T] fp32 (-inf there) if
    ``return_lse`` (lse is not differentiable). The backward is split (deterministic) or atomic dQ,
    whichever was tuned faster; split while ``torch.are_deterministic_algorithms_enabled()``
    (:mod:`.sparse_bwd`).
    """
    q, k, v = _check(q, k, v, block_mask.block_size, "block_sparse_attention")
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        raise ValueError(f"block_sparse_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    scale = _scale(q.shape[-1], scale)
    if _needs_grad(q, k, v):
        out, lse = _BlockSparseAttention.apply(q, k, v, block_mask, scale, cu_seqlens)
    else:
        out, lse = block_sparse_attention_fwd(
            q, k, v, block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.block_size, scale,
            cu_seqlens=cu_seqlens, return_lse=return_lse, mask_source=block_mask.source, mask_memo=block_mask.memo,
        )  # fmt: skip
    return (out, lse) if return_lse else out
