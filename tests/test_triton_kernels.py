"""The Triton kernels on CPU, through Triton's interpreter (``TRITON_INTERPRET=1``), against the fp64
reference ops.

Tolerance from the data: the kernel's error vs an fp64 oracle must be at most twice the error of the
same computation done in plain PyTorch in the input dtype, plus a small epsilon. Outputs are poisoned
with NaN (integer scratch with huge values) before each kernel call, so unwritten elements fail.

The interpreter flag must be set before triton is imported (``triton.jit`` reads it at decoration time,
also for triton's own ``tl.sum``/``tl.cumsum``); ``tests/conftest.py`` sets it on machines without CUDA.
On a machine with CUDA these tests are skipped unless ``TRITON_INTERPRET=1`` is already set: the GPU
tests run the compiled kernels there.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

_INTERPRET_ON = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if torch.cuda.is_available() and not _INTERPRET_ON:
    pytest.skip(
        "interpreter tests run on CPU-only machines (set TRITON_INTERPRET=1 to force)",
        allow_module_level=True,
    )
pytest.importorskip("triton")

import numpy as np  # noqa: E402
from kernel_helpers import (  # noqa: E402
    EPS,
    BackwardLaunches,
    assert_within_lowp,
    deterministic_algorithms,
    lowp_attention,
    poisoned_outputs,
    rand_mask,
    rand_qkv,
    rel,
    token_keep,
    varlen_mask,
)

from seerattn import BlockMask  # noqa: E402
from seerattn.ops import attention_with_block_scores, block_sparse_attention, reference  # noqa: E402
from seerattn.ops._triton import KernelConfig  # noqa: E402
from seerattn.ops._triton import block_scores as bs_mod  # noqa: E402
from seerattn.ops._triton import sparse_fwd as sp_mod  # noqa: E402

pytestmark = [
    # The interpreter evaluates both branches of tl.where, so inf - inf in a discarded branch warns.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    # FlexAttention's eager path (CPU) is the intended reference-speed path here.
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning"),
]


def assert_bthd_memory(out: torch.Tensor) -> None:
    """out is [B, H, T, D] shaped and [B, T, H, D] in memory (SDPA's flash layout): transformers'
    ``out.transpose(1, 2).contiguous()`` is then free."""
    b, h, t, d = out.shape
    assert out.stride() == (t * h * d, d, h * d, 1), out.stride()
    assert out.transpose(1, 2).is_contiguous()


def check_sparse(q, k, v, mask, cu_seqlens=None, config=None):
    """Run the kernel (poisoned outputs) and compare out and lse with the fp64 reference."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    with poisoned_outputs():
        if config is None:
            out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, cu_seqlens=cu_seqlens, impl="triton")
        else:
            out, lse = sp_mod.block_sparse_attention_fwd(
                q, k, v, mask.kv_num_blocks, mask.kv_indices, mask.block_size, scale, cu_seqlens, True, config
            )
    ref_out, ref_lse = reference.block_sparse_attention(
        q.double(), k.double(), v.double(), mask, return_lse=True, cu_seqlens=cu_seqlens
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_bthd_memory(out)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    keep = token_keep(mask, q.shape[1], cu_seqlens, q.shape[2])
    lp_out, lp_lse, _ = lowp_attention(q, k, v, keep, scale)
    eps = EPS[q.dtype]
    assert rel(out, ref_out) <= 2 * rel(lp_out, ref_out) + eps, (rel(out, ref_out), rel(lp_out, ref_out))
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows with no kept key must have lse = -inf"
    assert (out[empty] == 0).all(), "rows with no kept key must be zero"
    fin = ~empty
    if fin.any():
        err = (lse[fin].double() - ref_lse[fin]).abs().max().item()
        lp_err = (lp_lse[fin].double() - ref_lse[fin]).abs().max().item()
        assert err <= 2 * lp_err + 10 * eps, (err, lp_err)
    return out, lse


# ---------------------------------------------------------------------------------------- block-sparse
# (T, Hq, Hkv, mask heads, block size, dtype): odd lengths, GQA 1/2/4, per-Hq and per-Hkv masks.
SPARSE_CASES = [
    (1, 2, 1, "hq", 16, torch.float32),
    (15, 4, 2, "hkv", 16, torch.float16),
    (63, 4, 1, "hq", 32, torch.float32),
    (64, 4, 4, "hq", 16, torch.float16),
    (65, 8, 2, "hkv", 16, torch.float32),
    (100, 4, 1, "hkv", 32, torch.float16),
    (257, 1, 1, "hq", 64, torch.float32),
    (100, 4, 1, "hq", 64, torch.float16),
]


@pytest.mark.parametrize(
    "t,hq,hkv,mh,bs,dtype",
    SPARSE_CASES,
    ids=[f"T{c[0]}-g{c[1] // c[2]}-{c[3]}-bs{c[4]}-{c[5]}" for c in SPARSE_CASES],
)
def test_sparse_matches_reference(t, hq, hkv, mh, bs, dtype):
    q, k, v = rand_qkv(2 if t < 100 else 1, hq, hkv, t, 32, dtype, seed=t)
    mask = rand_mask(q.shape[0], hq if mh == "hq" else hkv, t, bs, density=0.5, seed=t)
    check_sparse(q, k, v, mask)


@pytest.mark.parametrize("bs,square", [(16, True), (32, False), (64, False)])
def test_sparse_all_kept_equals_dense(bs, square):
    """All causal blocks kept == dense causal; ``square`` also keeps every block above the diagonal
    (long tails of masked entries at the end of each list)."""
    t = 100
    q, k, v = rand_qkv(1, 4, 2, t, 16, torch.float32, seed=bs)
    nb = math.ceil(t / bs)
    ones = torch.ones(1, 4, nb, nb, dtype=torch.bool)
    full = BlockMask.from_dense(ones if square else ones.tril(), bs, t)
    out, lse = check_sparse(q, k, v, full)
    dense_out, dense_lse = reference.causal_attention(q.double(), k.double(), v.double(), return_lse=True)
    assert rel(out, dense_out) < 1e-5 and (lse.double() - dense_lse).abs().max() < 1e-5


@pytest.mark.parametrize(
    "bs,mh,cfg",
    [
        (16, "hq", None),
        (32, "hkv", None),
        (32, "hq", KernelConfig(64, 32, 1)),  # the block-32 GPU candidates
        (32, "hq", KernelConfig(32, 64, 1)),
    ],
    ids=["union-tiles", "plain-tiles", "union2-b32", "gather2-b32"],
)
def test_sparse_empty_rows(bs, mh, cfg):
    """Rows with kv_num_blocks 0, and rows keeping only blocks above the diagonal, are empty."""
    t, hq, hkv = 96, 4, 2
    q, k, v = rand_qkv(1, hq, hkv, t, 16, torch.float32, seed=3)
    h = hq if mh == "hq" else hkv
    nb = math.ceil(t / bs)
    dense = torch.ones(1, h, nb, nb, dtype=torch.bool).tril()
    dense[:, :, 1] = False  # empty list
    dense[:, 0, 0] = False
    dense[:, 0, 0, nb - 1] = True  # only a block above the diagonal: fully masked by causality
    mask = BlockMask.from_dense(dense, bs, t)
    assert int(mask.kv_num_blocks[0, 0, 1]) == 0
    out, lse = check_sparse(q, k, v, mask, config=cfg)
    rows = slice(bs, 2 * bs)
    assert (out[:, :, rows] == 0).all() and torch.isneginf(lse[:, :, rows]).all()
    first = slice(0, hq // h)  # the query heads of mask head 0
    assert (out[:, first, :bs] == 0).all() and torch.isneginf(lse[:, first, :bs]).all()


@pytest.mark.parametrize("mh,bs", [("hq", 16), ("hkv", 32)])
def test_sparse_varlen(mh, bs):
    """Packed sequences, one shorter than a block and one empty, T not a multiple of the block."""
    lens = [5, 40, 0, 71]
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    hq, hkv = 4, 2
    q, k, v = rand_qkv(1, hq, hkv, total, 16, torch.float16, seed=7)
    nb = math.ceil(max(lens) / bs)
    g = torch.Generator().manual_seed(5)
    dense = (torch.rand(len(lens), hq if mh == "hq" else hkv, nb, nb, generator=g) < 0.6) | torch.eye(
        nb, dtype=torch.bool
    )
    mask = BlockMask.from_dense(dense, bs, nb * bs)
    check_sparse(q, k, v, mask, cu_seqlens=cu)


# Tile shapes the single interpreter config does not reach: two mask blocks gathered per step,
# one program for the whole GQA group (rows < block), union tiles of 2 or 4 mask rows.
CONFIG_CASES = [
    ("gather2", 16, "hkv", KernelConfig(32, 32, 2)),
    ("full-group", 32, "hkv", KernelConfig(64, 16, 4)),
    ("union4", 16, "hq", KernelConfig(64, 16, 1)),
    ("union2-pack2", 16, "hkv", KernelConfig(64, 16, 2)),
    # the GPU candidates added for 32-token mask blocks: a 2-row union, one-row tiles with 2-block steps
    ("union2-b32", 32, "hq", KernelConfig(64, 32, 1)),
    ("gather2-b32", 32, "hq", KernelConfig(32, 64, 1)),
]


@pytest.mark.parametrize("name,bs,mh,cfg", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_sparse_tile_variants(name, bs, mh, cfg):
    t, hq, hkv = 90, 8, 2
    q, k, v = rand_qkv(1, hq, hkv, t, 16, torch.float32, seed=11)
    mask = rand_mask(1, hq if mh == "hq" else hkv, t, bs, density=0.4, seed=11)
    check_sparse(q, k, v, mask, config=cfg)


def test_sparse_invalid_config_is_refused():
    q, k, v = rand_qkv(1, 2, 1, 32, 16, torch.float32)
    mask = rand_mask(1, 2, 32, 16)
    with pytest.raises(ValueError, match="pack must divide"):
        sp_mod.block_sparse_attention_fwd(
            q, k, v, mask.kv_num_blocks, mask.kv_indices, 16, 0.25, config=KernelConfig(32, 16, 4)
        )


def test_union_lists():
    mask = rand_mask(2, 3, 150, 16, density=0.3, seed=2, diag=False)
    with poisoned_outputs():
        unum, uidx = sp_mod.build_union_lists(mask.kv_num_blocks, mask.kv_indices, 2)
    dense = mask.to_dense()
    nq = dense.shape[2]
    for b in range(2):
        for h in range(3):
            for t in range(unum.shape[2]):
                rows = [r for r in (2 * t, 2 * t + 1) if r < nq]
                want = [
                    j * 16 + sum(int(dense[b, h, r, j]) << u for u, r in enumerate(rows))
                    for j in range(nq)
                    if dense[b, h, rows, j].any()
                ]
                n = int(unum[b, h, t])
                assert uidx[b, h, t, :n].tolist() == want


def test_sparse_no_return_lse():
    q, k, v = rand_qkv(1, 2, 1, 40, 16, torch.float32)
    mask = rand_mask(1, 2, 40, 16)
    with poisoned_outputs():
        out = block_sparse_attention(q, k, v, mask, impl="triton")
    ref = reference.block_sparse_attention(q, k, v, mask)
    assert isinstance(out, torch.Tensor) and rel(out, ref) < 1e-5


# ---------------------------------------------------------------------------------------- block scores
SCORE_CASES = [
    (1, 2, 1, 16, torch.float32),
    (15, 2, 2, 16, torch.float16),
    (64, 4, 2, 32, torch.float32),
    (65, 4, 1, 16, torch.float16),
    (100, 4, 4, 64, torch.float32),
    (257, 2, 1, 32, torch.float32),
]


@pytest.mark.parametrize(
    "t,hq,hkv,bs,dtype", SCORE_CASES, ids=[f"T{c[0]}-g{c[1] // c[2]}-bs{c[3]}-{c[4]}" for c in SCORE_CASES]
)
def test_block_scores_match_reference(t, hq, hkv, bs, dtype):
    q, k, v = rand_qkv(1, hq, hkv, t, 32, dtype, seed=100 + t)
    with poisoned_outputs():
        out, lse, scores = attention_with_block_scores(q, k, v, block_size=bs, impl="triton")
    ref_out, ref_lse, ref_scores = reference.attention_with_block_scores(
        q.double(), k.double(), v.double(), block_size=bs
    )
    nb = math.ceil(t / bs)
    assert scores.shape == (1, hq, nb, nb) and scores.dtype == torch.float32
    assert_bthd_memory(out)
    for x in (out, lse, scores):
        assert not torch.isnan(x).any()
    # Plain PyTorch in the input dtype: softmax map, block max, row normalisation.
    keep = torch.ones(t, t, dtype=torch.bool).tril()
    scale = 1.0 / math.sqrt(q.shape[-1])
    lp_out, lp_lse, p = lowp_attention(q, k, v, keep, scale)
    pad = nb * bs - t
    pp = torch.nn.functional.pad(p, (0, pad, 0, pad)).view(1, hq, nb, bs, nb, bs).amax((3, 5))
    lp_scores = pp / pp.sum(-1, keepdim=True)
    eps = EPS[dtype]
    assert rel(out, ref_out) <= 2 * rel(lp_out, ref_out) + eps
    assert (lse.double() - ref_lse).abs().max() <= 2 * (lp_lse.double() - ref_lse).abs().max() + 10 * eps
    assert (scores.double() - ref_scores).abs().max() <= 2 * (lp_scores.double() - ref_scores).abs().max() + eps
    assert torch.allclose(scores.sum(-1), torch.ones(1, hq, nb), atol=1e-5)
    assert (scores.triu(1) == 0).all()


def test_block_scores_four_blocks_per_tile():
    """A 64-row tile over four 16-token query blocks, with several tiles per persistent program."""
    t, hq, hkv, bs = 200, 4, 2, 16
    q, k, v = rand_qkv(2, hq, hkv, t, 16, torch.float32, seed=9)
    with poisoned_outputs():
        out, lse, scores = bs_mod.attention_with_block_scores_fwd(q, k, v, bs, 0.25, config=KernelConfig(64, 16, 1))
    ref_out, ref_lse, ref_scores = reference.attention_with_block_scores(q, k, v, block_size=bs, scale=0.25)
    assert rel(out, ref_out) < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    assert (scores - ref_scores).abs().max() < 1e-6


def test_block_scores_output_equals_sparse_all_kept():
    t, bs = 130, 32
    q, k, v = rand_qkv(1, 4, 2, t, 32, torch.float32, seed=4)
    out, lse, _ = attention_with_block_scores(q, k, v, block_size=bs, impl="triton")
    nb = math.ceil(t / bs)
    full = BlockMask.from_dense(torch.ones(1, 2, nb, nb, dtype=torch.bool).tril(), bs, t)
    out2, lse2 = block_sparse_attention(q, k, v, full, return_lse=True, impl="triton")
    assert rel(out, out2) < 1e-6 and (lse - lse2).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------- validation
def test_bf16_refused_under_interpreter():
    q, k, v = rand_qkv(1, 2, 1, 32, 16, torch.bfloat16)
    with pytest.raises(TypeError, match="bf16 is silently wrong"):
        attention_with_block_scores(q, k, v, block_size=16, impl="triton")


def test_unsupported_head_dim_and_block_size():
    q, k, v = rand_qkv(1, 2, 1, 32, 24, torch.float32)
    with pytest.raises(NotImplementedError, match="head dim 24"):
        attention_with_block_scores(q, k, v, block_size=16, impl="triton")
    q, k, v = rand_qkv(1, 2, 1, 32, 16, torch.float32)
    mask = rand_mask(1, 2, 32, 256)
    with pytest.raises(NotImplementedError, match="block size 256"):
        block_sparse_attention(q, k, v, mask, impl="triton")


# ---------------------------------------------------------------------------------------- flex (eager, CPU)
@pytest.mark.parametrize("mh", ["hq", "hkv"])
def test_flex_matches_reference(mh):
    t, hq, hkv, bs = 100, 4, 2, 16
    q, k, v = rand_qkv(1, hq, hkv, t, 16, torch.float32, seed=21)
    dense = rand_mask(1, hq if mh == "hq" else hkv, t, bs, density=0.5, seed=21).to_dense()
    dense[:, 0, 2] = False  # an empty row
    mask = BlockMask.from_dense(dense, bs, t)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="flex")
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, mask, return_lse=True)
    assert rel(out, ref_out) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = ~torch.isinf(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < 1e-5


def test_flex_varlen_not_implemented():
    q, k, v = rand_qkv(1, 2, 1, 40, 16, torch.float32)
    mask = rand_mask(2, 2, 32, 16)
    cu = torch.tensor([0, 8, 40], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        block_sparse_attention(q, k, v, mask, cu_seqlens=cu, impl="flex")


# ---------------------------------------------------------------------------------------- backward
def _atomic(cfg: KernelConfig) -> KernelConfig:
    return dataclasses.replace(cfg, atomic_dq=True)


@dataclasses.dataclass
class DqMode:
    name: str  # "split" or "atomic"
    launches: BackwardLaunches

    def assert_ran_once(self) -> None:
        """One backward ran since the last check, in this mode."""
        expected = ["dkdv-atomic"] if self.name == "atomic" else ["dkdv-split", "dq"]
        assert self.launches.take() == expected


@pytest.fixture(params=["split", "atomic"])
def dq_mode(request, monkeypatch) -> DqMode:
    """The backward's dQ mode, forced through the dK/dV candidate list (the interpreter's one
    config, or its atomic twin)."""
    from seerattn.ops._triton import config, sparse_bwd

    if request.param == "atomic":
        monkeypatch.setattr(sparse_bwd, "dkdv_configs", lambda *a: [_atomic(c) for c in config.dkdv_configs(*a)])
    return DqMode(request.param, BackwardLaunches(monkeypatch))


def grads(fn, q, k, v, dout, *args, **kwargs):
    """(out, dq, dk, dv) of ``fn(q, k, v, ...)`` for the upstream gradient ``dout``."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, *args, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def check_sparse_grads(q, k, v, mask, cu_seqlens=None, seed=0):
    """Triton gradients (poisoned buffers) against fp64 autograd of the reference, within 3x the
    error of the same gradients in plain low-precision PyTorch (the output within 2x)."""
    g = torch.Generator().manual_seed(seed + 99)
    dout = torch.randn(q.shape, generator=g).to(q.dtype)
    with poisoned_outputs():
        got = grads(block_sparse_attention, q, k, v, dout, mask, cu_seqlens=cu_seqlens, impl="triton")
    oracle = grads(
        reference.block_sparse_attention, q.double(), k.double(), v.double(), dout.double(), mask, cu_seqlens=cu_seqlens
    )
    keep = token_keep(mask, q.shape[1], cu_seqlens, q.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1])
    lowp = grads(lambda a, b, c: lowp_attention(a, b, c, keep, scale)[0], q, k, v, dout)
    for name, x, lp, ref, factor in zip(("out", "dq", "dk", "dv"), got, lowp, oracle, (2, 3, 3, 3), strict=True):
        assert x.dtype == q.dtype and x.shape == ref.shape, name
        assert not torch.isnan(x).any(), f"{name} has NaN (unwritten or 0/0)"
        assert_within_lowp(name, x, lp, ref, q.dtype, factor)
    return got


# (T, Hq, Hkv, mask heads, block size, dtype): odd lengths, GQA 1/2/4/8, per-Hq and per-Hkv masks.
GRAD_CASES = [
    (1, 2, 1, "hq", 16, torch.float32),
    (15, 4, 2, "hkv", 16, torch.float16),
    (63, 4, 1, "hq", 32, torch.float32),
    (65, 8, 2, "hkv", 16, torch.float32),
    (100, 8, 1, "hkv", 32, torch.float16),
    (100, 4, 4, "hq", 64, torch.float16),
    (257, 2, 1, "hq", 64, torch.float32),
]


@pytest.mark.parametrize(
    "t,hq,hkv,mh,bs,dtype",
    GRAD_CASES,
    ids=[f"T{c[0]}-g{c[1] // c[2]}-{c[3]}-bs{c[4]}-{c[5]}" for c in GRAD_CASES],
)
def test_sparse_grads_match_reference(t, hq, hkv, mh, bs, dtype, dq_mode):
    """Includes empty rows (an empty list, a row keeping only a block above the diagonal); split
    and atomic dQ."""
    q, k, v = rand_qkv(1, hq, hkv, t, 16 if t > 200 else 32, dtype, seed=t)
    mask = rand_mask(1, hq if mh == "hq" else hkv, t, bs, density=0.5, seed=t, empty_rows=True)
    check_sparse_grads(q, k, v, mask, seed=t)
    dq_mode.assert_ran_once()


def test_sparse_grads_empty_rows_are_zero(dq_mode):
    """Rows with no kept key: zero output and zero dq; their dout does not reach dk/dv."""
    t, bs, hq, hkv = 64, 16, 2, 1
    q, k, v = rand_qkv(1, hq, hkv, t, 16, torch.float32, seed=4)
    dense = torch.ones(1, hq, 4, 4, dtype=torch.bool).tril()
    dense[0, :, 2] = False  # query block 2 of every head keeps nothing
    mask = BlockMask.from_dense(dense, bs, t)
    out, dq, dk, dv = check_sparse_grads(q, k, v, mask)
    rows = slice(2 * bs, 3 * bs)
    assert (out[:, :, rows] == 0).all() and (dq[:, :, rows] == 0).all()
    dq_mode.assert_ran_once()


@pytest.mark.parametrize("mh,bs", [("hq", 16), ("hkv", 32)])
def test_sparse_grads_varlen(mh, bs, dq_mode):
    """Packed sequences, one shorter than a block and one empty, T not a multiple of the block."""
    lens = [5, 40, 0, 71]
    hq, hkv = 4, 2
    mask, cu = varlen_mask(lens, hq if mh == "hq" else hkv, bs)
    q, k, v = rand_qkv(1, hq, hkv, int(cu[-1]), 16, torch.float16, seed=7)
    check_sparse_grads(q, k, v, mask, cu_seqlens=cu)
    dq_mode.assert_ran_once()


def _gpu_candidates(monkeypatch, fn, *args):
    """The candidate list ``fn`` gives on a GPU (the interpreter has one config per list)."""
    from seerattn.ops._triton import config

    with monkeypatch.context() as m:
        m.setattr(config, "interpreting", lambda: False)
        return fn(*args)


@pytest.mark.parametrize("bs,mh", [(32, "hq"), (64, "hkv"), (128, "hq")])
def test_every_tile_candidate_forward_and_backward(monkeypatch, bs, mh):
    """Each GPU tile candidate of the forward, of the dK/dV pass (split and atomic dQ) and of the dQ
    pass runs here too: the forward's output and lse and every gradient match the fp64 reference."""
    from seerattn.ops._triton import config, sparse_bwd

    t, hq, hkv, d = bs + 37, 4, 2, 16
    q, k, v = rand_qkv(1, hq, hkv, t, d, torch.float32, seed=bs)
    mask = rand_mask(1, hq if mh == "hq" else hkv, t, bs, density=0.6, seed=bs, empty_rows=True)
    hpm = hq // mask.num_heads
    for cfg in _gpu_candidates(monkeypatch, config.sparse_configs, bs, hpm, d):
        check_sparse(q, k, v, mask, config=cfg)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    qd, kd, vd = (x.double().requires_grad_(True) for x in (q, k, v))
    ref_out, ref_lse = reference.block_sparse_attention(qd, kd, vd, mask, return_lse=True)
    oracle = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton")
    scale = d**-0.5
    lists = (mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
    dkdv_cands = _gpu_candidates(monkeypatch, config.dkdv_configs, bs, d)
    dq_cands = _gpu_candidates(monkeypatch, config.dq_configs, bs, hpm, d)
    assert {c.atomic_dq for c in dkdv_cands} == {False, True}
    for i in range(max(len(dkdv_cands), len(dq_cands))):
        c1, c2 = dkdv_cands[i % len(dkdv_cands)], dq_cands[i % len(dq_cands)]
        with poisoned_outputs():
            got = sparse_bwd.block_sparse_attention_bwd(
                q, k, v, out, lse, dout, *lists, bs, scale, dkdv_config=c1, dq_config=c2
            )
        for name, x, ref in zip(("dq", "dk", "dv"), got, oracle, strict=True):
            assert rel(x, ref) < 1e-5, (name, c1.short(), c2.short(), rel(x, ref))


def test_sparse_backward_takes_dout_in_either_layout():
    """The HF path hands the backward a dout in the forward output's [B, T, Hq, D] memory (the gradient
    of ``out.transpose(1, 2)``); the tests above a [B, Hq, T, D]-contiguous one. The same values in
    either layout give bitwise equal gradients (split path: no atomics)."""
    q, k, v = rand_qkv(2, 4, 2, 40, 16, torch.float32, seed=6)
    mask = rand_mask(2, 2, 40, 16, density=0.6, seed=6)
    dout_bthd = torch.randn(2, 40, 4, 16, generator=torch.Generator().manual_seed(6)).transpose(1, 2)
    with deterministic_algorithms():
        a = grads(block_sparse_attention, q, k, v, dout_bthd, mask, impl="triton")
        b = grads(block_sparse_attention, q, k, v, dout_bthd.contiguous(), mask, impl="triton")
    assert_bthd_memory(a[0])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert a[1].abs().sum() > 0


def test_sparse_backward_is_deterministic():
    """The untuned default is the split path (no atomics): two backward passes give bitwise equal
    gradients (GQA group 4, per-Hq masks)."""
    q, k, v = rand_qkv(1, 4, 1, 50, 16, torch.float16, seed=5)
    mask = rand_mask(1, 4, 50, 16, density=0.6, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).half()
    a = grads(block_sparse_attention, q, k, v, dout, mask, impl="triton")
    b = grads(block_sparse_attention, q, k, v, dout, mask, impl="triton")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_dkdv_candidates_are_split_then_atomic(monkeypatch):
    """On the GPU every dK/dV tile is a candidate twice, split first (the untuned default is the
    deterministic path), then with atomic dQ; the dQ pass refuses an atomic config."""
    from seerattn.ops._triton import config, sparse_bwd

    for bs in (32, 64, 128):
        cands = _gpu_candidates(monkeypatch, config.dkdv_configs, bs, 128)
        split = [c for c in cands if not c.atomic_dq]
        assert len(cands) == len(set(cands)) and cands[: len(split)] == split  # no repeats, split first
        assert set(map(_atomic, split)) <= set(cands[len(split) :])
    assert config.dkdv_configs(64, 16) == [c for c in config.dkdv_configs(64, 16) if not c.atomic_dq]  # interpreter
    q, k, v = rand_qkv(1, 2, 1, 32, 16, torch.float32)
    mask = rand_mask(1, 2, 32, 16)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton")
    lists = (mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
    with pytest.raises(ValueError, match="atomic_dq belongs to the dK/dV config"):
        sparse_bwd.block_sparse_attention_bwd(
            q, k, v, out, lse, torch.ones_like(q), *lists, 16, 0.25, dq_config=_atomic(KernelConfig(32, 16, 2, 4, 1))
        )


def _tune_split_vs_atomic(monkeypatch, atomic_ms: float):
    """Tuning on, the interpreter's dK/dV tile as split and atomic candidates, a fake timer that
    launches each candidate (recording which kernels it ran) and gives atomic ``atomic_ms``, split 1.0."""
    from seerattn.ops._triton import config, sparse_bwd

    def atomic_first(mask_block, head_dim):
        split = config.dkdv_configs(mask_block, head_dim)[0]
        return [_atomic(split), split]

    monkeypatch.setenv("SEERATTN_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(sparse_bwd, "dkdv_configs", atomic_first)
    monkeypatch.setattr(config, "_TUNED", {})
    launches = BackwardLaunches(monkeypatch)
    timed: dict[str, list[str]] = {}

    def bench(launch, cfg):
        launches.take()
        launch(cfg)
        timed["atomic" if cfg.atomic_dq else "split"] = launches.take()
        return atomic_ms if cfg.atomic_dq else 1.0

    monkeypatch.setattr(config, "_bench", bench)
    return launches, timed


def test_tuner_picks_split_or_atomic_with_its_dq_work(monkeypatch):
    """Split and atomic dK/dV candidates are timed with the dQ work each implies (the dQ pass, or
    none); the faster one runs and its gradients match the reference."""
    q, k, v = rand_qkv(1, 4, 2, 70, 16, torch.float32, seed=2)
    mask = rand_mask(1, 2, 70, 32, density=0.6, seed=2, empty_rows=True)
    for atomic_ms, mode in ((0.5, "dkdv-atomic"), (2.0, "dkdv-split")):
        launches, timed = _tune_split_vs_atomic(monkeypatch, atomic_ms)
        check_sparse_grads(q, k, v, mask)
        assert timed == {"atomic": ["dkdv-atomic"], "split": ["dkdv-split", "dq"]}
        assert launches.take()[0] == mode


def test_deterministic_mode_runs_the_split_path(monkeypatch):
    """With ``torch.use_deterministic_algorithms(True)`` the split path runs although the tuner
    prefers atomic dQ (and the list puts it first), atomic candidates are not timed, two runs are
    bitwise equal, and a forced atomic config is refused."""
    from seerattn.ops._triton import sparse_bwd

    q, k, v = rand_qkv(1, 4, 1, 50, 16, torch.float16, seed=5)
    mask = rand_mask(1, 4, 50, 16, density=0.6, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).half()
    launches, timed = _tune_split_vs_atomic(monkeypatch, atomic_ms=0.5)
    grads(block_sparse_attention, q, k, v, dout, mask, impl="triton")
    assert launches.take() == ["dkdv-atomic"]  # what the tuner picks without the switch
    timed.clear()
    with deterministic_algorithms():
        a = grads(block_sparse_attention, q, k, v, dout, mask, impl="triton")
        b = grads(block_sparse_attention, q, k, v, dout, mask, impl="triton")
        assert launches.take() == ["dkdv-split", "dq"] * 2
        assert "atomic" not in timed
        out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="triton")
        lists = (mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
        atomic = _atomic(KernelConfig(16, 16, 1, 4, 1))
        with pytest.raises(RuntimeError, match="not deterministic"):
            sparse_bwd.block_sparse_attention_bwd(q, k, v, out, lse, dout, *lists, 16, 0.25, dkdv_config=atomic)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    monkeypatch.setenv("SEERATTN_TRITON_AUTOTUNE", "0")  # untuned: the first candidate allowed, split here
    with deterministic_algorithms():
        grads(block_sparse_attention, q, k, v, dout, mask, impl="triton")
    assert launches.take() == ["dkdv-split", "dq"]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_lse_is_not_differentiable(impl):
    q, k, v = rand_qkv(1, 2, 1, 40, 16, torch.float32)
    q.requires_grad_(True)
    out, lse = block_sparse_attention(q, k, v, rand_mask(1, 2, 40, 16), return_lse=True, impl=impl)
    assert out.requires_grad and not lse.requires_grad


def test_triton_block_scores_refuses_gradients():
    q, k, v = rand_qkv(1, 2, 1, 32, 16, torch.float32)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="no backward"):
        attention_with_block_scores(q, k, v, block_size=16, impl="triton")
    with torch.no_grad():  # the gate-target path: no gradients wanted, so it runs
        attention_with_block_scores(q, k, v, block_size=16, impl="triton")


def test_flex_gradients_on_cpu_are_refused():
    """FlexAttention has no CPU backward: a clear error (its own), never a detached output."""
    q, k, v = rand_qkv(1, 2, 1, 32, 16, torch.float32)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        block_sparse_attention(q, k, v, rand_mask(1, 2, 32, 16), impl="flex")


def test_backward_tuning_is_keyed_by_the_mask_kind(monkeypatch):
    """As the forward: the dK/dV and dQ choices are cached per (shape, mask kind), so a dense and a
    10 % policy mask of one shape are each timed (fake timer) and keep their own choice."""
    from seerattn import SparsityPolicy, mask_from_scores
    from seerattn.ops._triton import config, sparse_bwd

    t, bs, h = 128, 32, 2
    cands = [KernelConfig(32, 16, 1, 4, 1), KernelConfig(16, 16, 1, 4, 1)]
    monkeypatch.setenv("SEERATTN_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(sparse_bwd, "dkdv_configs", lambda *a: cands)
    monkeypatch.setattr(sparse_bwd, "dq_configs", lambda *a: cands)
    monkeypatch.setattr(config, "_TUNED", {})
    timed = []
    monkeypatch.setattr(config, "_bench", lambda launch, cfg: timed.append(cfg) or 1.0 + cands.index(cfg))
    scores = torch.rand(1, h, t // bs, t // bs, generator=torch.Generator().manual_seed(0))
    q, k, v = rand_qkv(1, h, 1, t, 16, torch.float32)
    for pol in (SparsityPolicy("dense"), SparsityPolicy("density", 0.1), SparsityPolicy("dense")):
        mask = mask_from_scores(scores, pol, t, bs)
        grads(block_sparse_attention, q, k, v, torch.ones_like(q), mask, impl="triton")
    keys = [k for k in config._TUNED if k[0] in ("dkdv", "dq")]
    assert len(keys) == 4 and len({k[-1] for k in keys}) == 2  # two passes x two mask kinds
    assert len(timed) == 8  # the third call (dense again) reuses the dense choice
