"""The decode-gate key cache's per-step append as one validated op (:func:`gate_key_append`), and the per-step
update of the blocks' key bounds (:func:`block_bounds_update`, ``DecodePolicy.bound_slots``).

Its eager reference is :meth:`seerattn.gate.GateKeyCache.append` with ``impl="eager"``, which calls this op for
``impl="triton"`` (the default on CUDA). Shape legend: B sequences, Hkv key/value heads, D head dim, Dg gate dim,
NB cache capacity in blocks, Ck number of K poolings.
"""

from __future__ import annotations

import torch

from ..block_mask import check_block_size
from .gate_ops import _POOLINGS

__all__ = ["block_bounds_update", "gate_key_append"]


def gate_key_append(
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
    *,
    block_size: int,
    poolings: tuple[str, ...],
) -> None:
    """Add one pre-RoPE K row per sequence to a decode-gate key cache, in place, in two Triton launches
    (:mod:`seerattn.ops._triton.kcache_append`): the same pools, keys and counters as the eager
    :meth:`~seerattn.gate.GateKeyCache.append`.

    Each sequence b folds ``k_new[b]`` into the running pools of its partial block (``lengths[b] % block_size``
    rows so far; none: the pools start afresh); where the row completes the block, the block's gate key (pooled,
    projected by ``k_proj``, RMS-normed, rotated with ``cos``/``sin``) goes to ``keys[b, :, min(num_blocks[b],
    NB - 1)]`` and ``num_blocks[b]`` grows by one; ``lengths[b]`` grows by one.

    Args:
        k_new: [B, Hkv, D] fp16 / bf16 / fp32 pre-RoPE K rows.
        pools: fp32 [B, Hkv, Ck, D] running max / min / sum of each partial block, in ``poolings`` order.
        keys: [B, Hkv, NB, Dg] gate keys, in the gate's dtype (``k_proj``'s).
        lengths, num_blocks: int64 [B] tokens and completed blocks per sequence (contiguous).
        k_proj: [Hkv, Ck * D, Dg] the gate's key projection (fp16 / bf16 / fp32).
        norm_weight: [Dg] the key RMSNorm's weight, in the gate's dtype; eps: its epsilon (> 0).
        cos, sin: [B, 1, Dg] the rotary tables at each sequence's partial-block start (``num_blocks * block_size``),
            or both None for a gate without RoPE.
        block_size: tokens per block (power of two); poolings: 1-3 distinct of ``avg``/``max``/``min``.

    Triton only (CUDA, or CPU under ``TRITON_INTERPRET=1``); no host synchronisation (capturable in a CUDA graph).
    Dg must be even (the kernel works on the two halves of the gate dimension, RoPE's rotate-half pairs).
    """
    op = "gate_key_append"
    from ._triton.config import check_device, check_shapes_and_devices

    tensors = {"k_new": k_new, "pools": pools, "keys": keys, "lengths": lengths, "num_blocks": num_blocks,
               "k_proj": k_proj, "norm_weight": norm_weight}  # fmt: skip
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: give both cos and sin (RoPE) or neither")
    if not isinstance(poolings, tuple) or not 1 <= len(poolings) <= 3 or any(p not in _POOLINGS for p in poolings):
        raise ValueError(f"{op}: poolings must be a tuple of 1-3 of {_POOLINGS}, got {poolings!r}")
    if len(set(poolings)) != len(poolings):
        raise ValueError(f"{op}: poolings must be distinct, got {poolings!r}")
    check_block_size(block_size, op)
    if keys.dim() != 4 or 0 in keys.shape:
        raise ValueError(f"{op}: keys must be a non-empty [B, Hkv, NB, Dg], got shape {tuple(keys.shape)}")
    b, hkv, _, dg = keys.shape
    if k_new.dim() != 3 or tuple(k_new.shape[:2]) != (b, hkv) or k_new.shape[2] == 0:
        raise ValueError(f"{op}: k_new must be [B={b}, Hkv={hkv}, D >= 1] like keys, got {tuple(k_new.shape)}")
    d, ck = k_new.shape[2], len(poolings)
    if dg % 2:
        raise ValueError(f"{op}: the gate dim Dg must be even (two halves: RoPE pairs), got {dg}")
    shapes = {
        "pools": (pools, (b, hkv, ck, d), "[B, Hkv, Ck, D]"),
        "k_proj": (k_proj, (hkv, ck * d, dg), "[Hkv, Ck * D, Dg]"),
        "norm_weight": (norm_weight, (dg,), "[Dg]"),
        "lengths": (lengths, (b,), "[B]"),
        "num_blocks": (num_blocks, (b,), "[B]"),
    }
    check_shapes_and_devices(op, shapes, tensors, "keys", "keys are", cos, sin, b, dg)
    floats = (torch.float16, torch.bfloat16, torch.float32)
    for name in ("k_new", "keys", "k_proj"):
        check_device(tensors[name], op, floats)
    check_device(pools, op, (torch.float32,))
    for name in ("keys", "norm_weight"):
        if tensors[name].dtype != k_proj.dtype:
            raise TypeError(f"{op}: {name} must be in the gate's dtype (k_proj's, {k_proj.dtype}), got "
                            f"{tensors[name].dtype}")  # fmt: skip
    if cos is not None and not (cos.is_floating_point() and sin.is_floating_point()):
        raise TypeError(f"{op}: cos and sin must be floating point, got {cos.dtype}, {sin.dtype}")
    for name in ("lengths", "num_blocks"):
        x = tensors[name]
        if x.dtype != torch.int64 or not x.is_contiguous():
            raise TypeError(f"{op}: {name} must be a contiguous int64 tensor [B] (updated in place), got {x.dtype}")
    if not isinstance(eps, float) or not eps > 0:
        raise ValueError(f"{op}: eps must be a float > 0 (the RMSNorm's epsilon), got {eps!r}")
    # the kernels update pools, keys and the counters in place: a copy would drop the update
    for name in ("pools", "keys"):
        if tensors[name].stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a unit last stride (it is updated in place)")
    from ._triton.kcache_append import gate_key_append_fwd

    k_new, k_proj = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_new, k_proj))
    norm_weight = norm_weight.contiguous()
    if cos is not None:
        cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (cos, sin))
    gate_key_append_fwd(
        k_new, pools, keys, lengths, num_blocks, k_proj, norm_weight, eps, cos, sin, block_size, poolings
    )


def block_bounds_update(
    key: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    block_size: int,
) -> None:
    """Write each sequence's last completed block's element-wise key min / max into ``kmin`` / ``kmax``, in place, in
    one Triton launch: :meth:`seerattn.gate.BlockBounds.update` (its eager reference, ``impl="eager"``).

    Block ``J = (lengths[b] - 1) // block_size - 1`` of sequence b (none where it is negative) covers the cache rows
    ``[starts[b] + J * block_size, + block_size)``; its bounds go to slot ``min(J, NB - 1)``.

    Args:
        key: [B, Hkv, T, D] fp16 / bf16 / fp32 post-RoPE keys of the KV cache.
        kmin, kmax: [B, Hkv, NB, D] in ``key``'s dtype, one stride layout.
        lengths: int32 / int64 [B] each sequence's tokens, this step's included.
        starts: int32 / int64 [B] each sequence's first row, or None (0).
        block_size: tokens per block (power of two).

    Triton only (CUDA, or CPU under ``TRITON_INTERPRET=1``); no host synchronisation (capturable in a CUDA graph).
    """
    op = "block_bounds_update"
    for name, x in (("key", key), ("kmin", kmin), ("kmax", kmax), ("lengths", lengths)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if key.dim() != 4 or kmin.dim() != 4 or 0 in key.shape or 0 in kmin.shape:
        raise ValueError(
            f"{op}: key [B, Hkv, T, D] and kmin [B, Hkv, NB, D], got {tuple(key.shape)}, {tuple(kmin.shape)}"
        )
    b, hkv, _, d = key.shape
    if (kmin.shape[0], kmin.shape[1], kmin.shape[3]) != (b, hkv, d):
        raise ValueError(f"{op}: kmin {tuple(kmin.shape)} must be [B={b}, Hkv={hkv}, NB, D={d}] like key")
    if kmax.shape != kmin.shape or kmax.stride() != kmin.stride() or {kmin.dtype, kmax.dtype} != {key.dtype}:
        raise ValueError(f"{op}: kmin and kmax must share shape, strides and key's dtype ({key.dtype})")
    for name, x in (("lengths", lengths), ("starts", starts)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int32, torch.int64) or tuple(x.shape) != (b,):
            raise ValueError(f"{op}: {name} must be an int32 / int64 tensor [B={b}]")
        if x.device != key.device:
            raise ValueError(f"{op}: {name} is on {x.device} but key is on {key.device}")
    check_block_size(block_size, op)
    from ._triton.config import check_device
    from ._triton.kcache_append import block_bounds_update_fwd

    check_device(key, op, (torch.float16, torch.bfloat16, torch.float32))
    check_device(kmin, op, (torch.float16, torch.bfloat16, torch.float32))
    lengths = lengths.contiguous()
    starts = None if starts is None else starts.contiguous()
    block_bounds_update_fwd(key, kmin, kmax, lengths, starts, block_size)
