"""``impl="flex"``: block-sparse attention through PyTorch FlexAttention on the same block mask.

Also the path of ``impl="fa4"`` (:mod:`seerattn.ops.fa4`): the same mask and call with FlexAttention's
FLASH backend (``backend="FLASH"``: FlashAttention-4's CuTe kernels) instead of its Triton kernels.

Used as a cross-check of the Triton kernels on the GPU and as a benchmark peer. The seerattn
:class:`~seerattn.BlockMask` is converted to FlexAttention's ``BlockMask`` with the kept blocks split
into *full* blocks (strictly below the block diagonal: FlexAttention skips the ``mask_mod`` there) and
*partial* blocks (the diagonal and anything above it: the causal ``mask_mod`` applies), which is the
fastest form FlexAttention accepts. Per-group (Hkv) masks are repeated over the query heads of each
group (FlexAttention indexes masks by query head). On CUDA the call goes through
``torch.compile(flex_attention)`` (compiled once per process); on CPU the eager path runs (slow,
for tiny test shapes only).

Shape legend: B batch, Hq/Hkv query/key-value heads, T tokens, D head dim.
Limitations: no varlen (``cu_seqlens``): packed sequences do not start on block boundaries, so their
masks do not map onto one block grid; use ``impl="triton"`` or ``"reference"`` for varlen.
Gradients go through FlexAttention's own backward; on CUDA its Triton backward compiles only for
mask blocks of at least 128 tokens (64-row tiles do not compile there), so smaller blocks raise
when gradients are required.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

from ..block_mask import BlockMask

__all__ = ["block_sparse_attention", "to_flex_block_mask"]

_COMPILED = None


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


BACKWARD_MIN_BLOCK = 128  # smallest mask block FlexAttention's compiled (Triton) backward accepts


def to_flex_block_mask(
    block_mask: BlockMask, num_q_heads: int, exact_mask_mod: bool = False, for_backward: bool = False
):
    """FlexAttention ``BlockMask`` with the same kept blocks, causal, heads expanded to Hq.

    Full (strictly-lower) and partial (diagonal and above) kept blocks are separated so that
    FlexAttention evaluates the causal ``mask_mod`` only where it can matter. The compiled kernel
    skips blocks that are not listed, so a causal ``mask_mod`` is exact there; FlexAttention's eager
    path ignores the block lists and applies only ``mask_mod``, so ``exact_mask_mod=True`` also
    looks the block up in the dense mask (for CPU use). ``for_backward`` also builds the transposed
    lists FlexAttention's backward walks.
    """
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    m = block_mask.expand_heads(num_q_heads)
    num, idx = m.kv_num_blocks, m.kv_indices  # [B, Hq, NQ], [B, Hq, NQ, NK]
    nq, nk = idx.shape[-2:]
    slot = torch.arange(nk, device=idx.device)
    # Straight from the lists (no [B, Hq, NQ, NK] dense pass: this runs per layer and call): a row's list is
    # ascending, so its blocks strictly left of the diagonal (full) are a prefix, and the rest (the diagonal and
    # anything above it: partial) follow; the partial list is that tail moved to the front.
    below = (slot < num.unsqueeze(-1)) & (idx < torch.arange(nq, device=idx.device).unsqueeze(-1))
    full_num = below.sum(-1, dtype=torch.int32)
    partial_num = num - full_num
    tail = torch.gather(idx, -1, (slot + full_num.unsqueeze(-1)).clamp(max=nk - 1).long())
    partial_idx = torch.where(slot < partial_num.unsqueeze(-1), tail, 0).to(torch.int32)
    full_idx = torch.where(below, idx, 0).to(torch.int32)
    mask_mod = _causal
    if exact_mask_mod:
        bs = m.block_size
        dense = m.to_dense()  # [B, Hq, NQ, NK]

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & dense[b, h, q_idx // bs, kv_idx // bs]

    kwargs = {}
    if "compute_q_blocks" in inspect.signature(FlexBlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = for_backward  # the transposed index only serves the backward
    return FlexBlockMask.from_kv_blocks(
        partial_num.contiguous(),
        partial_idx.contiguous(),
        full_num.contiguous(),
        full_idx.contiguous(),
        BLOCK_SIZE=m.block_size,
        mask_mod=mask_mod,
        seq_lengths=(m.seq_len, m.seq_len),
        **kwargs,
    )


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


BACKENDS = ("TRITON", "FLASH")


# Compiled entries of the FlexAttention call (compiled with dynamic=False: one per sequence length, mask
# block size, backend and grad mode a process meets; an eval over many prompt lengths meets dozens). Past
# it a call raises (below); dynamo's default of 8 would stop an eval run at its ninth prompt length.
RECOMPILE_LIMIT = 64


def _no_eager_fallback(device: torch.device):
    """On CUDA: a compiled call past the recompile limit raises instead of running FlexAttention's eager
    path (the whole T x T score matrix, and no FLASH backend: a silent change of implementation); the
    limit is raised to :data:`RECOMPILE_LIMIT`. PyTorch versions without these switches keep their
    behaviour; the CPU runs the eager path anyway."""
    config = torch._dynamo.config
    if device.type != "cuda" or not hasattr(config, "fail_on_recompile_limit_hit"):
        return contextlib.nullcontext()
    limit = (
        {"recompile_limit": max(config.recompile_limit, RECOMPILE_LIMIT)} if hasattr(config, "recompile_limit") else {}
    )
    return config.patch(fail_on_recompile_limit_hit=True, **limit)


def flex_attention_call(q, k, v, flex_mask, scale: float, return_lse: bool, backend: str = "TRITON"):
    """One FlexAttention call on a prepared mask; returns (out, lse or None).

    ``backend``: ``"TRITON"`` (FlexAttention's default choice of kernel: its Triton kernels on CUDA, no
    ``BACKEND`` option passed, so PyTorch versions without that option work) or ``"FLASH"``
    (FlashAttention-4 through ``kernel_options={"BACKEND": "FLASH"}``; CUDA only, see
    :mod:`seerattn.ops.fa4` for what it takes).
    """
    if backend not in BACKENDS:
        raise ValueError(f"flex_attention_call: backend must be one of {BACKENDS}, got {backend!r}")
    fn = _flex_fn(q.device)
    gqa = q.shape[1] != k.shape[1]
    kwargs = {}
    q_block, kv_block = flex_mask.BLOCK_SIZE
    if backend == "FLASH":
        kwargs["kernel_options"] = {"BACKEND": "FLASH"}  # FA4 picks its own tiles from the mask's block size
    elif q.is_cuda and min(q_block, kv_block) < 128:
        # The compiled kernel's default tile (128 x 64 on Hopper) must divide the mask blocks.
        kwargs["kernel_options"] = {"BLOCK_M": min(q_block, 128), "BLOCK_N": min(kv_block, 64)}
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the older return_lse flag
        AuxRequest = None
    with _no_eager_fallback(q.device):
        if not return_lse:
            return fn(q, k, v, block_mask=flex_mask, scale=scale, enable_gqa=gqa, **kwargs), None
        if AuxRequest is not None:
            aux_req = AuxRequest(lse=True)
            out, aux = fn(q, k, v, block_mask=flex_mask, scale=scale, enable_gqa=gqa, return_aux=aux_req, **kwargs)
            return out, aux.lse
        out, lse = fn(q, k, v, block_mask=flex_mask, scale=scale, enable_gqa=gqa, return_lse=True, **kwargs)
        return out, lse


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    return_lse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "TRITON",
):
    """Same contract as :func:`seerattn.ops.reference.block_sparse_attention` (no varlen).

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] -> out [B, Hq, T, D] (and lse [B, Hq, T] fp32).
    Rows with no kept key give zeros and lse = -inf. Differentiable in q, k, v (see the module
    docstring for the block sizes the CUDA backward accepts). ``backend`` as in
    :func:`flex_attention_call`; ``"FLASH"`` is ``impl="fa4"``, whose checks
    (:func:`seerattn.ops.fa4.block_sparse_attention`) run before this is called.
    """
    if cu_seqlens is not None:
        raise NotImplementedError(
            "block_sparse_attention(impl='flex') does not support cu_seqlens: packed sequences do not "
            "start on block boundaries, so their masks do not share one FlexAttention block grid; use "
            "impl='triton' or impl='reference' for varlen"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if backend == "TRITON" and grad and q.is_cuda and block_mask.block_size < BACKWARD_MIN_BLOCK:
        raise NotImplementedError(
            f"block_sparse_attention(impl='flex') with gradients: FlexAttention's compiled backward supports "
            f"mask blocks of >= {BACKWARD_MIN_BLOCK} tokens, got {block_mask.block_size}; use impl='triton' "
            "(any block size) or run without gradients"
        )
    flex_mask = to_flex_block_mask(block_mask, q.shape[1], exact_mask_mod=q.device.type != "cuda", for_backward=grad)
    out, lse = flex_attention_call(q, k, v, flex_mask, scale, return_lse, backend)
    if not return_lse:
        return out
    return out, lse.float()  # FlexAttention already gives zeros and lse = -inf on empty rows
