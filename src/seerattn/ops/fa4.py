"""``impl="fa4"``: block-sparse attention through FlashAttention-4's block-sparse kernels.

FlashAttention-4 (the optional ``flash-attn-4`` package, module ``flash_attn.cute``, CuTe DSL; Hopper
and Blackwell) is reached through PyTorch FlexAttention's FLASH backend: the same FlexAttention
``BlockMask`` as ``impl="flex"`` (:func:`seerattn.ops.flex.to_flex_block_mask`: full blocks below the
diagonal, partial blocks with the causal ``mask_mod`` on it), ``kernel_options={"BACKEND": "FLASH"}``,
under ``torch.compile``. Forward and backward (dQ, dK, dV), GQA (FA4 reads each K/V head for its
query heads), per-query-head and per-group masks (repeated over the group, as for ``"flex"``),
``return_lse`` (natural log, detached), rows with no kept key give zeros and lse = -inf.

What it takes (:func:`unsupported` says why a case is refused; nothing falls back to another impl):

- CUDA tensors on a GPU of a family FA4 has block-sparse kernels for (:data:`FA4_BLOCKS`), fp16 or
  bf16, head dim 8..128 and a multiple of 8, no varlen (``cu_seqlens``: the FLASH backend takes one
  block grid per batch entry, as ``"flex"``);
- mask blocks whose size FA4's tiles match, forward and backward separately (:data:`FA4_BLOCKS`);
- a PyTorch whose FlexAttention has the FLASH backend (and, for gradients, its FLASH backward);
- for gradients: ``torch.use_deterministic_algorithms`` off (FA4's deterministic block-sparse backward
  needs sm_100 and dQ write-order metadata; ``impl="triton"`` has a deterministic backward at any block).

Shape legend: B batch, Hq/Hkv query/key-value heads, T tokens, D head dim.
Nothing here imports ``flash_attn`` or ``torch._inductor`` at import time (CPU installs and CI never
need them); the checks look them up on first use.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import math

import torch

from ..block_mask import BlockMask

__all__ = ["FA4_BLOCKS", "PACKAGE", "block_sparse_attention", "check", "installed", "unsupported", "version"]

PACKAGE = "flash-attn-4"
INSTALL_HINT = (
    f"install the optional extra: pip install 'seerattn[fa4]' (or pip install --pre {PACKAGE}; with a CUDA 13 "
    f"PyTorch: pip install --pre '{PACKAGE}[cu13]')"
)

# Square mask blocks (one block size for queries and keys) FA4's block-sparse kernels take, by compute
# capability major, for head dims <= 128: (forward, backward). Read from flash-attn-4 4.0.0b36's source
# (flash_attn/cute/interface.py: _tile_size_fwd_sm90, _fit_sm90_fwd_tile_to_block_sparsity,
# _tile_size_bwd_sm90, _get_fwd_config; block_sparsity.py: normalize_block_sparse_config[_bwd]):
# - sm_90 (H100/H200): the key tile must equal the key block. Forward tiles shrink to 64 x 64 for 64-token
#   blocks, else 128 x 128; the backward's key tile is 128 ("expects sparse_block_size 128").
# - sm_100 (B200/GB200): the forward runs two 128-row query tiles per CTA, so query blocks must be a
#   multiple of 256 (longer than 128 tokens); key blocks a multiple of 128 both ways. Not run on an sm_100
#   GPU by this project (docs/experiments/fa4/README.md).
FA4_BLOCKS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    9: ((64, 128), (128,)),
    10: ((256,), (128, 256)),
}
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # larger head dims change FA4's tiles (and the blocks they match): not accepted here


def version() -> str | None:
    """The installed ``flash-attn-4`` version, or None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def installed() -> bool:
    """Whether ``flash_attn.cute`` (FA4) can be imported (looked up once, without importing it)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:  # no flash_attn package at all
        return False


LOG2_E = 1.0 / math.log(2.0)


@functools.cache
def _lse_scaled_by_ln2() -> bool:
    """Whether this PyTorch multiplies the FLASH backend's LSE by ln 2 on the way out.

    FlexAttention's Triton kernels keep their statistics in base 2 and the public ``flex_attention``
    converts them with a factor ln 2; FlashAttention-4's LSE is already natural. PyTorch versions whose
    ``flex_attention`` predates the per-backend switch (``stats_are_log2``) apply the factor to FA4's LSE
    too: measured on the H200 with torch 2.11, the LSE came back as ln 2 times the reference's (outputs
    exact), so it is divided back here.
    """
    from torch.nn.attention import flex_attention as flex_module

    return "stats_are_log2" not in inspect.getsource(flex_module)


@functools.lru_cache(maxsize=1)
def _flex_has_flash_backend() -> bool:
    """This PyTorch's FlexAttention accepts ``kernel_options={"BACKEND": "FLASH"}``."""
    from torch.nn.attention.flex_attention import FlexKernelOptions

    return "BACKEND" in getattr(FlexKernelOptions, "__annotations__", {})


@functools.lru_cache(maxsize=1)
def _flex_has_flash_backward() -> bool:
    """This PyTorch's FLASH backend has a backward (FlexAttention lowers it to FA4's backward kernel)."""
    try:
        from torch._inductor.kernel.flex import flex_flash_attention
    except ImportError:
        return False
    return hasattr(flex_flash_attention, "create_flex_flash_attention_backward_kernel")


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def unsupported(
    device: torch.device,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    grad: bool = False,
    varlen: bool = False,
    return_lse: bool = False,
) -> str | None:
    """Why ``impl="fa4"`` cannot run this case, or None when it can (see the module docstring).

    The first reason found, in the order: device, package, PyTorch, GPU, dtype, head dim, varlen, forward
    block size, then (with ``grad``) the backward's PyTorch support, block size, determinism and
    ``return_lse``.
    """
    found = _refusal(device, block_size, head_dim, dtype, grad, varlen, return_lse)
    return None if found is None else found[1]


def check(
    device: torch.device,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    grad: bool = False,
    varlen: bool = False,
    return_lse: bool = False,
) -> None:
    """Raise with :func:`unsupported`'s reason: ``ImportError`` when FA4 is not installed,
    ``NotImplementedError`` for a case it does not take."""
    found = _refusal(device, block_size, head_dim, dtype, grad, varlen, return_lse)
    if found is not None:
        raise found[0](f"block_sparse_attention: {found[1]}")


def _refusal(device, block_size, head_dim, dtype, grad, varlen, return_lse) -> tuple[type[Exception], str] | None:
    """(exception type, reason) of the first check that fails, or None (see :func:`unsupported`)."""
    no = NotImplementedError
    if device.type != "cuda":
        return no, f"impl='fa4' runs on CUDA tensors only (FlashAttention-4 kernels), got tensors on {device}"
    if not installed():
        return ImportError, (
            f"impl='fa4' needs the optional package {PACKAGE} (module flash_attn.cute), not installed; {INSTALL_HINT}"
        )
    if not _flex_has_flash_backend():
        return no, (
            f"impl='fa4' runs through FlexAttention's FLASH backend, which torch {torch.__version__} does not have "
            "(kernel_options BACKEND); upgrade PyTorch"
        )
    major, minor = _capability(device)
    if major not in FA4_BLOCKS:
        return no, (
            f"impl='fa4': FlashAttention-4's block-sparse kernels run on sm_90 / sm_100 GPUs "
            f"(compute capability {sorted(FA4_BLOCKS)}.x), this GPU is sm_{major}{minor}"
        )
    if dtype not in DTYPES:
        return no, f"impl='fa4' takes float16 or bfloat16 q, k, v, got {dtype}"
    if not (8 <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
        return no, f"impl='fa4' takes head dims 8..{MAX_HEAD_DIM} that are multiples of 8, got D={head_dim}"
    if varlen:
        return no, (
            "impl='fa4' does not support cu_seqlens: packed sequences do not start on block boundaries, so their "
            "masks do not share one block grid; use impl='triton' or impl='reference' for varlen"
        )
    fwd_blocks, bwd_blocks = FA4_BLOCKS[major]
    if block_size not in fwd_blocks:
        return no, (
            f"impl='fa4' on sm_{major}x: FlashAttention-4's forward takes mask blocks of {list(fwd_blocks)} tokens, "
            f"got {block_size}; use impl='triton' (any power-of-two block)"
        )
    if not grad:
        return None
    if not _flex_has_flash_backward():
        return no, (
            f"impl='fa4' with gradients: torch {torch.__version__}'s FLASH backend has no backward; run without "
            "gradients or use impl='triton'"
        )
    if block_size not in bwd_blocks:
        return no, (
            f"impl='fa4' with gradients on sm_{major}x: FlashAttention-4's backward takes mask blocks of "
            f"{list(bwd_blocks)} tokens, got {block_size}; use impl='triton' (any block) or run without gradients"
        )
    if torch.are_deterministic_algorithms_enabled():
        return no, (
            "impl='fa4' with gradients under torch.use_deterministic_algorithms(True): FlashAttention-4's "
            "deterministic block-sparse backward needs sm_100 and dQ write-order metadata that seerattn's masks "
            "do not carry; impl='triton' has a deterministic backward"
        )
    if return_lse:
        # Seen on the H200 (torch 2.11): the compiled backward refuses any graph that returns the LSE
        # ("FLASH backend backward does not support differentiating through logsumexp"), used or not.
        return no, (
            "impl='fa4' with gradients and return_lse=True: FlexAttention's FLASH backward does not "
            "differentiate through the LSE; call with return_lse=False or use impl='triton'"
        )
    return None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    return_lse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Same contract as :func:`seerattn.ops.reference.block_sparse_attention` (no varlen).

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] -> out [B, Hq, T, D] (and lse [B, Hq, T] fp32).
    Raises (:func:`check`: ``ImportError`` when FA4 is not installed, ``NotImplementedError`` for a case
    it does not take) with the reason of :func:`unsupported`; never runs another implementation instead.
    """
    from .flex import block_sparse_attention as flex_attention

    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    check(q.device, block_mask.block_size, q.shape[-1], q.dtype, grad, cu_seqlens is not None, return_lse)
    result = flex_attention(q, k, v, block_mask, scale=scale, return_lse=return_lse, backend="FLASH")
    if not return_lse or not _lse_scaled_by_ln2():
        return result
    out, lse = result
    return out, lse * LOG2_E  # undo the extra ln 2 (see _lse_scaled_by_ln2)
