"""Shared factories and checks for the kernel tests (interpreter tests and reference-op tests).

- q/k/v and block-mask factories (random, with odd lengths, GQA, empty rows, varlen);
- the data-derived tolerance: an implementation's error against an fp64 oracle must be within
  ``factor`` times the error of the same computation done in plain low-precision PyTorch (2 for
  outputs, 3 for gradients), plus a small epsilon (:func:`assert_within_lowp`);
- NaN poisoning of every ``torch.empty`` made inside a block (unwritten elements then fail);
- the backward's dQ mode: which kernels ran (:class:`BackwardLaunches`), PyTorch's determinism
  switch turned on for a block (:func:`deterministic_algorithms`).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from seerattn import BlockMask

EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.float64: 1e-12}


@contextlib.contextmanager
def poisoned_outputs():
    """Every ``torch.empty`` made inside is filled with NaN (floats) or 2**30 (integers)."""
    orig = torch.empty

    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        t.fill_(float("nan") if t.is_floating_point() else 2**30)
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = orig


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` inside the block, the previous setting after."""
    prev = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn_only)


class BackwardLaunches:
    """Records the launches of the backward's dK/dV and dQ kernels (installed with ``monkeypatch``):
    ``runs`` lists ``"dkdv-split"``, ``"dkdv-atomic"`` and ``"dq"`` in launch order."""

    def __init__(self, monkeypatch):
        from seerattn.ops._triton import sparse_bwd

        self.runs: list[str] = []
        for attr, name in (("_dkdv_kernel", "dkdv"), ("_dq_kernel", "dq")):
            monkeypatch.setattr(sparse_bwd, attr, self._wrap(getattr(sparse_bwd, attr), name))

    def _wrap(self, kernel, name: str):
        runs = self.runs

        class Recorded:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    if name == "dkdv":
                        runs.append("dkdv-atomic" if kwargs["ATOMIC_DQ"] else "dkdv-split")
                    else:
                        runs.append(name)
                    return launch(*args, **kwargs)

                return run

        return Recorded()

    def take(self) -> list[str]:
        """The launches recorded since the last call."""
        out = list(self.runs)
        self.runs.clear()
        return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64; when ``b`` is exactly zero (e.g. dq of a one-token sequence: the
    softmax is constant, so its exact gradient is 0) the RMS of ``a - b`` instead."""
    a, b = a.double(), b.double()
    norm = b.norm()
    return ((a - b).norm() / (norm if norm > 0 else math.sqrt(max(b.numel(), 1)))).item()


def assert_within_lowp(name: str, got, lowp, oracle, dtype: torch.dtype, factor: float) -> None:
    """``rel(got, oracle) <= factor * rel(lowp, oracle) + eps(dtype)`` (the project's tolerance rule)."""
    err, lp_err = rel(got, oracle), rel(lowp, oracle)
    assert err <= factor * lp_err + EPS[dtype], f"{name}: error {err:.3g} vs low-precision PyTorch {lp_err:.3g}"


def rand_qkv(b, hq, hkv, t, d, dtype, seed=0):
    """q [b, hq, t, d], k, v [b, hkv, t, d], standard normal, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, generator=g).to(dtype)
    return mk(hq), mk(hkv), mk(hkv)


def rand_mask(b, h, t, bs, density=0.5, seed=0, diag=True, empty_rows=False):
    """A random block mask; ``empty_rows`` makes head 0's second block row empty and its first row
    keep only the last block (above the diagonal, so fully masked by causality)."""
    g = torch.Generator().manual_seed(seed + 1)
    nb = math.ceil(t / bs)
    dense = torch.rand(b, h, nb, nb, generator=g) < density
    if diag:
        dense |= torch.eye(nb, dtype=torch.bool)
    if empty_rows and nb > 1:
        dense[:, 0, 1] = False
        dense[:, 0, 0] = False
        dense[:, 0, 0, nb - 1] = True
    return BlockMask.from_dense(dense, bs, t)


def varlen_mask(lens, h, bs, density=0.6, seed=5):
    """(mask over the longest sequence, cu_seqlens int32) for packed sequences of ``lens``."""
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
    nb = math.ceil(max(lens) / bs)
    g = torch.Generator().manual_seed(seed)
    dense = (torch.rand(len(lens), h, nb, nb, generator=g) < density) | torch.eye(nb, dtype=torch.bool)
    return BlockMask.from_dense(dense, bs, nb * bs), cu


def token_keep(mask: BlockMask, hq: int, cu_seqlens=None, total=None) -> torch.Tensor:
    """Bool [B, Hq, T, T] of kept (query, key) pairs (block mask, causal, sequence boundaries)."""
    m = mask.expand_heads(hq)
    if cu_seqlens is None:
        return m.to_token_mask()
    keep = torch.zeros(1, hq, total, total, dtype=torch.bool)
    dense = m.to_dense()
    bounds = cu_seqlens.tolist()
    for i, (s0, s1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        n = s1 - s0
        if n == 0:
            continue
        tok = dense[i].repeat_interleave(m.block_size, -2).repeat_interleave(m.block_size, -1)[:, :n, :n]
        keep[0, :, s0:s1, s0:s1] = tok & torch.ones(n, n, dtype=torch.bool).tril()
    return keep


def lowp_attention(q, k, v, keep, scale):
    """Masked attention in plain PyTorch in the input dtype: (out, lse, probabilities);
    differentiable (empty rows give zero output and zero gradients)."""
    g = q.shape[1] // k.shape[1]
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = (q @ kx.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~keep, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return p @ vx, torch.logsumexp(logits.float(), -1), p
