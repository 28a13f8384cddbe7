"""Public functional API: tensors in, tensors out, validated, dispatched to one implementation.

Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), T tokens, D head dim,
NB = ceil(T / block_size). Layout ``[B, H, T, D]``.

``impl`` chooses the implementation:

- ``"reference"``: eager PyTorch (:mod:`seerattn.ops.reference`), any device, fp64-capable.
- ``"triton"``: the Triton kernels (:mod:`seerattn.ops._triton`, imported on first use).
- ``"flex"``: PyTorch FlexAttention with the same block mask (``block_sparse_attention`` only).
- ``"fa4"``: FlashAttention-4's block-sparse kernels through FlexAttention's FLASH backend
  (``block_sparse_attention`` only; the optional ``flash-attn-4`` package, sm_90 / sm_100 GPUs, the
  block sizes of :data:`seerattn.ops.fa4.FA4_BLOCKS`; :mod:`seerattn.ops.fa4`).
- ``None`` (default): ``"reference"`` off CUDA; on CUDA ``"triton"``, except in
  ``block_sparse_attention`` where :func:`auto_impl` applies the measured rule :data:`AUTO_IMPL`
  (``"fa4"`` for the cases listed there, where FA4 is installed and takes the case).
  :func:`resolve_impl` returns the choice without running anything (benchmarks record it).

An explicit ``impl`` never falls back to another one: if it cannot run, it raises.

Gradients: ``block_sparse_attention`` is differentiable in q, k, v for every ``impl`` (reference:
autograd; triton: the block-sparse backward kernels; flex, fa4: FlexAttention's backward with its Triton
or FLASH kernels). The ``lse`` it
returns is not differentiable (detached). ``attention_with_block_scores`` is differentiable only
with ``impl="reference"``; the Triton kernel raises when gradients are required rather than
returning a detached output.

NaN: a NaN in q, k or v is never dropped. Every output row that reads it (its own query row, or
k/v of a key it attends to) is NaN in every ``impl``, so is its lse (a NaN in q or k), and in
``attention_with_block_scores`` so is the whole block-score row of its query block; rows that attend
to nothing stay zeros. No host synchronisation checks for it. The kernels may spread a NaN in v
further, to rows of the same tile that do not attend to its key (0 x NaN inside a tile product).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from ..block_mask import BlockMask, check_block_size, num_blocks
from . import fa4, reference
from .decode import budget_decode_blocks, quest_bound_scores, sparse_decode_attention, top_block_indices
from .gate_ops import gate_block_logits, select_blocks
from .gate_query import gate_decode_query
from .kcache import block_bounds_update, gate_key_append

__all__ = [
    "AUTO_FA4_SHAPES",
    "AUTO_IMPL",
    "IMPLS",
    "AttentionCase",
    "attention_with_block_scores",
    "auto_impl",
    "block_sparse_attention",
    "block_bounds_update",
    "budget_decode_blocks",
    "gate_block_logits",
    "gate_decode_query",
    "gate_key_append",
    "quest_bound_scores",
    "resolve_impl",
    "select_blocks",
    "sparse_decode_attention",
    "top_block_indices",
]

IMPLS = ("reference", "triton", "flex", "fa4")

# The automatic choice of block_sparse_attention on CUDA (impl=None): (mask block size, gradients) -> impl.
# A listed "fa4" applies where FlashAttention-4 can run the case (installed, a GPU, block size, head dim,
# dtype it takes: seerattn.ops.fa4.unsupported); every other case runs "triton". The entries follow the
# measurements of docs/experiments/fa4/README.md (ours vs FA4 on the same masks, forward and forward +
# backward, in one run): flip an entry here with the numbers there. Values: "triton" or "fa4".
AUTO_IMPL: dict[tuple[int, bool], str] = {
    # H200, 32k, Llama-3.1-8B shapes, per-group masks, 10 % (session 8, trees 9528a75 / 948e696): forward FA4
    # 1.578 ms vs ours 2.26-2.44; forward + backward FA4 7.54 vs ours 9.54 (Flex 11.07). Block 64: the forward
    # ties (2.199 vs 2.200) and FA4 has no backward, so it stays "triton" (not listed).
    (128, False): "fa4",
    (128, True): "fa4",
}

# FA4 runs under torch.compile with static shapes: every new (shape, block, dtype, grad) compiles once
# (dynamo + Inductor, seconds), which our Triton kernels never pay. The automatic choice therefore takes FA4
# for at most this many distinct call shapes per process (training and a fixed-length eval use one or a
# few); a new shape past them runs ours, with one warning. An explicit impl="fa4" is not limited by this
# (it raises past flex.RECOMPILE_LIMIT compiled entries instead).
AUTO_FA4_SHAPES = 8
_auto_fa4_shapes: set[AttentionCase] = set()  # the cases (with their shapes) the automatic choice sent to FA4
_auto_fa4_warned: list[bool] = [False]
_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionCase:
    """What the automatic choice of ``block_sparse_attention`` looks at besides the device.

    block_size: mask block (tokens); head_dim: D; dtype: of q, k, v; grad: gradients are required
    (a backward will run); varlen: ``cu_seqlens`` is given; return_lse: the LSE is returned; shape: q's and
    k's shapes (with the fields above, what a compiled FA4 call is specialised on), or None when unknown
    (then :data:`AUTO_FA4_SHAPES` is not consulted).
    """

    block_size: int
    head_dim: int
    dtype: torch.dtype
    grad: bool = False
    varlen: bool = False
    return_lse: bool = False
    shape: tuple | None = None


def auto_impl(device: torch.device, case: AttentionCase | None = None) -> str:
    """``impl=None``'s choice: ``"reference"`` off CUDA; on CUDA :data:`AUTO_IMPL`'s entry for ``case``
    where that impl can run it, else ``"triton"`` (``case`` None: an op other than block_sparse_attention).
    An ``"fa4"`` entry also needs ``case.shape`` to be one FA4 already ran for in this process, or room
    for a new one under :data:`AUTO_FA4_SHAPES` (each new shape compiles)."""
    if device.type != "cuda":
        return "reference"
    if case is None:
        return "triton"
    choice = AUTO_IMPL.get((case.block_size, case.grad), "triton")
    if choice != "fa4":
        return choice
    if fa4.unsupported(device, case.block_size, case.head_dim, case.dtype, case.grad, case.varlen, case.return_lse):
        return "triton"
    if case.shape is not None and case not in _auto_fa4_shapes and len(_auto_fa4_shapes) >= AUTO_FA4_SHAPES:
        return "triton"  # the compile budget of the automatic choice is spent (see AUTO_FA4_SHAPES)
    return "fa4"


def _note_auto_fa4(impl: str, case: AttentionCase) -> None:
    """Count a shape the automatic choice sent to FA4; warn once when a new shape had to run ours because
    :data:`AUTO_FA4_SHAPES` shapes are compiled already."""
    if impl == "fa4":
        _auto_fa4_shapes.add(case)
    elif len(_auto_fa4_shapes) >= AUTO_FA4_SHAPES and not _auto_fa4_warned[0]:
        _auto_fa4_warned[0] = True
        _logger.warning(
            "block_sparse_attention: the automatic choice ran FlashAttention-4 for %d call shapes (each compiles "
            "once); new shapes run seerattn's Triton kernel from now on. Pass impl='fa4' to keep FA4 (it compiles "
            "every new shape) or raise seerattn.ops.AUTO_FA4_SHAPES.",
            AUTO_FA4_SHAPES,
        )


def resolve_impl(
    impl: str | None,
    device: torch.device,
    op: str,
    allowed: tuple[str, ...] = IMPLS,
    case: AttentionCase | None = None,
) -> str:
    """The implementation ``op`` runs on ``device``: ``impl`` when given (checked against ``allowed``),
    else :func:`auto_impl` (``case``: the block-sparse attention call's parameters, for its measured rule).

    E.g. ``resolve_impl(None, torch.device("cuda"), "block_sparse_attention", case=AttentionCase(128, 128,
    torch.bfloat16))`` is ``"fa4"`` where FA4 is installed on an H200, ``"triton"`` without it.
    """
    if impl is None:
        impl = auto_impl(device, case)
    if impl not in allowed:
        raise ValueError(f"{op}: impl must be one of {allowed} (or None for automatic), got {impl!r}")
    return impl


def _check_qkv(q, k, v, op: str, varlen: bool = False) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, H, T, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
        for axis, label in ((0, "batch B"), (1, "heads H"), (3, "head dim D")):  # T = 0 is refused below
            if x.shape[axis] == 0:
                raise ValueError(f"{op}: {name} has {label} = 0 (shape {tuple(x.shape)} [B, H, T, D]); it must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bq, hq, tq, dq = q.shape
    bk, hk, tk, dk = k.shape
    if bq != bk or tq != tk:
        raise ValueError(
            f"{op}: q and k must have the same batch and length (prefill, causal), got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    if dq != dk:
        raise ValueError(f"{op}: q and k head dims differ: {dq} vs {dk}")
    if hq % hk:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hk}) for GQA")
    if tq == 0:
        raise ValueError(f"{op}: sequence length must be >= 1")
    if varlen and bq != 1:
        raise ValueError(f"{op}: with cu_seqlens the batch must be 1 (sequences packed along T), got {bq}")


def attention_with_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int = 64,
    scale: float | None = None,
    impl: str | None = None,
):
    """Causal attention that also returns the block-level ground truth of SeerAttention.

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, T, D].
        block_size: tokens per block (power of two); the last block may be partial.
        scale: softmax scale, default ``1 / sqrt(D)``.
        impl: ``"reference"``, ``"triton"`` or None (automatic).

    Returns:
        ``(out [B, Hq, T, D], lse [B, Hq, T] fp32, block_scores [B, Hq, NB, NB] fp32)`` where
        ``block_scores[I, J]`` is the max of the causal softmax map over block (I, J), rows
        normalised to sum 1, zero above the diagonal.
    """
    op = "attention_with_block_scores"
    _check_qkv(q, k, v, op)
    check_block_size(block_size, op)
    impl = resolve_impl(impl, q.device, op, allowed=("reference", "triton"))
    if impl == "reference":
        return reference.attention_with_block_scores(q, k, v, block_size=block_size, scale=scale)
    from ._triton import attention_with_block_scores as triton_impl

    return triton_impl(q, k, v, block_size=block_size, scale=scale)


def _check_mask(block_mask, q, k, op: str, cu_seqlens) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"{op}: block_mask must be a seerattn.BlockMask, got {type(block_mask).__name__}")
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    if mh not in (hq, hkv):
        raise ValueError(
            f"{op}: block_mask has {mh} heads; accepted: Hq={hq} (per query head) or Hkv={hkv} (per group)"
        )
    if block_mask.device != q.device:
        raise ValueError(f"{op}: block_mask is on {block_mask.device} but q is on {q.device}")
    if q.device.type == "cpu":
        block_mask.validate()
    if cu_seqlens is None:
        if mb != b:
            raise ValueError(f"{op}: block_mask batch {mb} != q batch {b}")
        if block_mask.seq_len != t:
            raise ValueError(f"{op}: block_mask covers {block_mask.seq_len} tokens but q has T={t}")
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: cu_seqlens must be a 1-D int32 tensor [N + 1]")
    if cu_seqlens.numel() < 2 or cu_seqlens.numel() - 1 != mb:
        raise ValueError(f"{op}: cu_seqlens describes {cu_seqlens.numel() - 1} sequences but block_mask has batch {mb}")
    longest = _cu_seqlens_longest(cu_seqlens, t, op)
    if num_blocks(longest, block_mask.block_size) > block_mask.shape[2]:
        raise ValueError(
            f"{op}: the longest sequence ({longest} tokens) needs more blocks than block_mask has "
            f"({block_mask.shape[2]})"
        )


# cu_seqlens tensors already validated: id -> (weak reference, tensor version, T, longest sequence). A padded or
# packed prefill hands one cu_seqlens tensor to every layer of a forward; its contents are read by the host (a
# synchronisation on CUDA) on the first layer only. An in-place change bumps the tensor's version: checked again.
_CU_SEQLENS_CHECKED: dict[int, tuple] = {}


def _cu_seqlens_longest(cu_seqlens: torch.Tensor, t: int, op: str) -> int:
    """The longest sequence of ``cu_seqlens`` (int32 [N + 1]) after checking that it starts at 0, is
    non-decreasing and ends at ``t``; reads the device once per tensor version (see ``_CU_SEQLENS_CHECKED``)."""
    # an inference tensor (made under torch.inference_mode) has no version counter to notice an in-place change
    # by: checked on every call
    cache = not cu_seqlens.is_inference()
    key = id(cu_seqlens)
    hit = _CU_SEQLENS_CHECKED.get(key) if cache else None
    if hit is not None and hit[0]() is cu_seqlens and hit[1:3] == (cu_seqlens._version, t):
        return hit[3]
    lens = cu_seqlens.diff()
    facts = torch.stack([cu_seqlens[0], cu_seqlens[-1], (lens < 0).any().int(), lens.max()])
    first, last, negative, longest = facts.tolist()  # one host read
    if first != 0 or last != t or negative:
        raise ValueError(f"{op}: cu_seqlens must start at 0, be non-decreasing and end at T={t}")
    if cache:
        ref = weakref.ref(cu_seqlens, lambda _, k=key: _CU_SEQLENS_CHECKED.pop(k, None))
        _CU_SEQLENS_CHECKED[key] = (ref, cu_seqlens._version, t, longest)
    return longest


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    return_lse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    impl: str | None = None,
):
    """Causal attention computed only on the kept blocks of ``block_mask``.

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (with ``cu_seqlens``: B == 1, sequences packed on T).
        block_mask: :class:`~seerattn.BlockMask` with Hq heads (per query head) or Hkv heads (shared
            by each GQA group) and B batch entries (number of sequences for varlen).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return lse [B, Hq, T] fp32 (-inf on rows with no kept key); not
            differentiable (no gradient flows through it).
        cu_seqlens: int32 [N + 1] boundaries of packed sequences (varlen).
        impl: ``"reference"``, ``"triton"``, ``"flex"``, ``"fa4"`` or None (automatic: :func:`auto_impl`,
            which on CUDA may pick ``"fa4"`` by block size and gradients; :func:`resolve_impl` tells which).

    Returns:
        out [B, Hq, T, D] (zeros on rows with no kept key; differentiable in q, k, v), and the
        detached lse if ``return_lse``. Memory layout: with ``impl="triton"`` out is [B, Hq, T, D] shaped,
        [B, T, Hq, D] in memory, like SDPA's flash backends (``out.transpose(1, 2)`` is contiguous, so
        transformers' ``[B, T, Hq, D]`` output costs no copy); the other impls return the layout their
        backend produces (no copy is added to change it), so callers must not assume either.

    Determinism (``impl="triton"`` backward): the tuner may pick a dK/dV pass that accumulates dQ
    with fp32 atomic adds (faster where it is, not bitwise reproducible); with
    ``torch.use_deterministic_algorithms(True)`` the two-pass, atomic-free backward runs instead,
    and two runs on the same inputs give bitwise equal gradients.
    """
    op = "block_sparse_attention"
    _check_qkv(q, k, v, op, varlen=cu_seqlens is not None)
    _check_mask(block_mask, q, k, op, cu_seqlens)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    shape = (tuple(q.shape), tuple(k.shape))
    case = AttentionCase(block_mask.block_size, q.shape[-1], q.dtype, grad, cu_seqlens is not None, return_lse, shape)
    automatic = impl is None
    impl = resolve_impl(impl, q.device, op, case=case)
    if automatic and AUTO_IMPL.get((case.block_size, grad)) == "fa4" and q.is_cuda:
        _note_auto_fa4(impl, case)
    if impl == "reference":
        fn = reference.block_sparse_attention
    elif impl == "flex":
        from .flex import block_sparse_attention as fn
    elif impl == "fa4":
        fn = fa4.block_sparse_attention
    else:
        from ._triton import block_sparse_attention as fn
    res = fn(q, k, v, block_mask, scale=scale, return_lse=return_lse, cu_seqlens=cu_seqlens)
    if not return_lse:
        return res
    out, lse = res
    return out, lse.detach()
