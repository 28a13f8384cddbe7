"""Reference ops (``impl="reference"``) against brute-force materialised computations and torch SDPA.

Everything runs in fp64 on CPU so that the comparisons are tight (1e-10 .. 1e-12); the brute-force
oracles here materialise the full ``[T, T]`` map and never reuse code from ``seerattn.ops.reference``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import seerattn
from seerattn import BlockMask, attention_with_block_scores, block_sparse_attention
from seerattn.block_mask import num_blocks
from seerattn.ops import reference

SEQ_LENS = (1, 15, 63, 64, 65, 100, 257)
ATOL = 1e-10


def _qkv(b, hq, hkv, t, d=16, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, t, d, generator=g, dtype=dtype)
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v


def _brute_attention(q, k, v, token_keep, scale=None):
    """Materialised masked softmax attention. token_keep: bool broadcastable to [B, Hq, T, T].

    Returns out [B, Hq, T, D] (0 on rows with no kept key), lse [B, Hq, T] (-inf there), probs.
    """
    hq = q.shape[1]
    g = hq // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ kk.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~token_keep, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    empty = ~token_keep.expand_as(logits).any(-1)
    probs = torch.softmax(logits.masked_fill(empty.unsqueeze(-1), 0.0), -1)
    probs = probs.masked_fill(empty.unsqueeze(-1), 0.0)
    return probs @ vv, lse, probs


def _causal(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


def _token_keep(dense_blocks, bs, t):
    """bool [B, H, T, T] from a block mask [B, H, NB, NB], by index arithmetic (not the library's)."""
    i = torch.arange(t)
    tok = dense_blocks[:, :, i // bs][:, :, :, i // bs]
    return tok & _causal(t)


def _brute_block_scores(probs, bs):
    """Max-pool of the causal softmax map over BxB windows (last partial), rows normalised."""
    b, h, t, _ = probs.shape
    pooled = F.max_pool2d(probs.reshape(b * h, 1, t, t), kernel_size=bs, stride=bs, ceil_mode=True)
    pooled = pooled.reshape(b, h, pooled.shape[-2], pooled.shape[-1])
    return pooled / pooled.sum(-1, keepdim=True)


def _random_blocks(b, h, nb, p, seed, keep_diag=True):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(b, h, nb, nb, generator=g) < p
    if keep_diag:
        dense |= torch.eye(nb, dtype=torch.bool)
    return dense


# ===================================================================== attention_with_block_scores


@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("block_size", [16, 64], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("t", SEQ_LENS, ids=lambda t: f"T{t}")
def test_block_scores_equal_brute_force(t, block_size, group):
    hkv = 2
    q, k, v = _qkv(1, hkv * group, hkv, t, d=8, seed=t * 7 + block_size + group)
    out, lse, scores = attention_with_block_scores(q, k, v, block_size=block_size, impl="reference")

    ref_out, ref_lse, probs = _brute_attention(q, k, v, _causal(t))
    ref_scores = _brute_block_scores(probs, block_size)
    nb = num_blocks(t, block_size)
    assert out.shape == q.shape and out.dtype == torch.float64
    assert lse.shape == (1, hkv * group, t)
    assert scores.shape == (1, hkv * group, nb, nb)
    torch.testing.assert_close(scores, ref_scores, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)

    # The same against torch's own kernels: SDPA with enable_gqa and with K/V repeated by hand.
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    rep = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True
    )
    torch.testing.assert_close(out, sdpa, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, rep, atol=ATOL, rtol=0)

    # Structure of the ground truth: rows sum to 1, exact zeros above the diagonal, diagonal > 0.
    torch.testing.assert_close(scores.sum(-1), torch.ones_like(scores[..., 0]), atol=1e-12, rtol=0)
    upper = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    assert (scores[..., upper] == 0).all()
    assert (scores.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_block_scores_hand_computed_tiny():
    """T=3, block 2, one head, D=1: every number checked by hand."""
    q = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).view(1, 1, 3, 1)
    k = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64).view(1, 1, 3, 1)
    v = torch.arange(3, dtype=torch.float64).view(1, 1, 3, 1)
    _, _, scores = attention_with_block_scores(q, k, v, block_size=2, scale=1.0, impl="reference")
    # P rows: [1, 0, 0]; [1/(1+e), e/(1+e), 0]; softmax([0, 2, -2]).
    row2 = torch.softmax(torch.tensor([0.0, 2.0, -2.0], dtype=torch.float64), 0)
    gt0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    raw1 = torch.tensor([max(row2[0], row2[1]), row2[2]], dtype=torch.float64)
    torch.testing.assert_close(scores[0, 0, 0], gt0, atol=1e-12, rtol=0)
    torch.testing.assert_close(scores[0, 0, 1], raw1 / raw1.sum(), atol=1e-12, rtol=0)


def test_block_scores_custom_scale_and_fp32_dtypes():
    q, k, v = _qkv(1, 4, 2, 40, dtype=torch.float32, seed=3)
    out, lse, scores = attention_with_block_scores(q, k, v, block_size=16, scale=0.3, impl="reference")
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and scores.dtype == torch.float32
    q64, k64, v64 = (x.double() for x in (q, k, v))
    ref_out, ref_lse, probs = _brute_attention(q64, k64, v64, _causal(40), scale=0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.double(), _brute_block_scores(probs, 16), atol=1e-5, rtol=0)


def test_block_scores_chunked_rows_long_sequence():
    """T past the reference's internal row chunk (1024 tokens) still equals the brute force."""
    t = 1100
    q, k, v = _qkv(1, 1, 1, t, d=4, seed=11)
    out, lse, scores = attention_with_block_scores(q, k, v, block_size=64, impl="reference")
    ref_out, ref_lse, probs = _brute_attention(q, k, v, _causal(t))
    torch.testing.assert_close(scores, _brute_block_scores(probs, 64), atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)


def test_default_impl_on_cpu_is_reference():
    q, k, v = _qkv(1, 2, 2, 33, seed=5)
    a = attention_with_block_scores(q, k, v, block_size=16)
    b = attention_with_block_scores(q, k, v, block_size=16, impl="reference")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ===================================================================== block_sparse_attention


@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("t,block_size", [(1, 16), (15, 16), (65, 16), (100, 64), (257, 64)])
@pytest.mark.parametrize("mask_heads", ["hq", "hkv"])
def test_all_kept_mask_equals_sdpa(t, block_size, group, mask_heads):
    hkv = 2
    hq = hkv * group
    q, k, v = _qkv(1, hq, hkv, t, d=8, seed=t + group)
    nb = num_blocks(t, block_size)
    h = hq if mask_heads == "hq" else hkv
    mask = BlockMask.from_dense(torch.ones(1, h, nb, nb, dtype=torch.bool), block_size, t)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="reference")
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, atol=ATOL, rtol=0)
    _, ref_lse, _ = _brute_attention(q, k, v, _causal(t))
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)


def test_causal_attention_helper_equals_sdpa():
    q, k, v = _qkv(2, 4, 2, 70, seed=2)
    out, lse = reference.causal_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    torch.testing.assert_close(lse, _brute_attention(q, k, v, _causal(70))[1])


@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("t,block_size", [(15, 16), (64, 16), (65, 16), (100, 32), (257, 64)])
def test_random_mask_equals_materialised(t, block_size, group):
    hkv = 2
    hq = hkv * group
    q, k, v = _qkv(2, hq, hkv, t, d=8, seed=100 + t + group)
    nb = num_blocks(t, block_size)
    # Random over the full square (blocks above the diagonal are legal in the format and must be
    # neutralised by causality); diagonal kept so no row is empty here.
    dense = _random_blocks(2, hq, nb, 0.4, seed=t * group)
    mask = BlockMask.from_dense(dense, block_size, t)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="reference")
    ref_out, ref_lse, _ = _brute_attention(q, k, v, _token_keep(dense, block_size, t))
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)
    # And the mask must actually matter: differs from dense causal when some causal block is dropped.
    causal_blocks = torch.ones(nb, nb, dtype=torch.bool).tril()
    if (~dense & causal_blocks).any():
        assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_empty_rows_give_zeros_and_neg_inf_lse():
    t, bs, hq, hkv = 70, 16, 4, 2
    nb = num_blocks(t, bs)
    dense = _random_blocks(1, hq, nb, 0.5, seed=9).tril()
    # Empty rows built directly in the index format (kv_num_blocks == 0), stale indices left behind.
    mask_ok = BlockMask.from_dense(dense, bs, t)
    num = mask_ok.kv_num_blocks.clone()
    num[0, 0, 1] = 0
    num[0, 3, nb - 1] = 0  # the partial last block row
    num[0, 2, :] = 0  # a whole head with nothing
    mask = BlockMask(num, mask_ok.kv_indices.clone(), bs, t)
    expect = dense.clone()
    expect[0, 0, 1] = False
    expect[0, 3, nb - 1] = False
    expect[0, 2] = False
    assert torch.equal(mask.to_dense(), expect)

    q, k, v = _qkv(1, hq, hkv, t, seed=4, requires_grad=True)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="reference")
    assert not out.isnan().any() and not lse.isnan().any()
    rows_empty = torch.zeros(1, hq, t, dtype=torch.bool)
    rows_empty[0, 0, bs : 2 * bs] = True
    rows_empty[0, 3, (nb - 1) * bs :] = True
    rows_empty[0, 2] = True
    assert (out[rows_empty] == 0).all()
    assert torch.isneginf(lse[rows_empty]).all()
    assert torch.isfinite(lse[~rows_empty]).all()
    ref_out, ref_lse, _ = _brute_attention(q, k, v, _token_keep(expect, bs, t))
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse[~rows_empty], ref_lse[~rows_empty], atol=ATOL, rtol=0)

    # Gradients through out and through the finite lse entries stay finite.
    (out.sum() + lse.masked_fill(rows_empty, 0.0).sum()).backward()
    for x in (q, k, v):
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (q.grad[rows_empty] == 0).all()


@pytest.mark.parametrize("group", [2, 4], ids=lambda g: f"gqa{g}")
def test_hkv_mask_equals_expanded_hq_mask(group):
    t, bs, hkv = 100, 16, 2
    hq = hkv * group
    nb = num_blocks(t, bs)
    q, k, v = _qkv(2, hq, hkv, t, seed=group)
    dense_kv = _random_blocks(2, hkv, nb, 0.3, seed=77)
    m_kv = BlockMask.from_dense(dense_kv, bs, t)
    m_q = BlockMask.from_dense(dense_kv.repeat_interleave(group, 1), bs, t)
    assert torch.equal(m_kv.expand_heads(hq).to_dense(), m_q.to_dense())
    out_kv, lse_kv = block_sparse_attention(q, k, v, m_kv, return_lse=True, impl="reference")
    out_q, lse_q = block_sparse_attention(q, k, v, m_q, return_lse=True, impl="reference")
    torch.testing.assert_close(out_kv, out_q, atol=0, rtol=0)
    torch.testing.assert_close(lse_kv, lse_q, atol=0, rtol=0)
    ref_out, _, _ = _brute_attention(q, k, v, _token_keep(m_q.to_dense(), bs, t))
    torch.testing.assert_close(out_kv, ref_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("lens", [(5, 70, 33), (16, 1, 47), (40,), (0, 20, 9)], ids=str)
@pytest.mark.parametrize("mask_heads", ["hq", "hkv"])
def test_varlen_equals_per_sequence_calls(lens, mask_heads):
    bs, hq, hkv = 16, 4, 2
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    nb = num_blocks(max(lens), bs)
    h = hq if mask_heads == "hq" else hkv
    dense = _random_blocks(len(lens), h, nb, 0.4, seed=sum(lens))
    mask = BlockMask.from_dense(dense, bs, max(lens))
    q, k, v = _qkv(1, hq, hkv, total, seed=len(lens))
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, cu_seqlens=cu, impl="reference")
    assert out.shape == q.shape and lse.shape == (1, hq, total)
    for i, (s0, s1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        n = s1 - s0
        if n == 0:
            continue
        sub = dense[i : i + 1, :, : num_blocks(n, bs), : num_blocks(n, bs)]
        m_i = BlockMask.from_dense(sub, bs, n)
        qi, ki, vi = q[:, :, s0:s1], k[:, :, s0:s1], v[:, :, s0:s1]
        o_i, l_i = block_sparse_attention(qi, ki, vi, m_i, return_lse=True, impl="reference")
        torch.testing.assert_close(out[:, :, s0:s1], o_i, atol=0, rtol=0)
        torch.testing.assert_close(lse[:, :, s0:s1], l_i, atol=0, rtol=0)
        # Per-sequence result is itself the materialised masked attention (no cross-sequence leak).
        g = hq // h
        ref_o, _, _ = _brute_attention(qi, ki, vi, _token_keep(sub.repeat_interleave(g, 1), bs, n))
        torch.testing.assert_close(o_i, ref_o, atol=ATOL, rtol=0)


def test_varlen_short_sequence_sees_only_itself():
    """A 3-token sequence after a 20-token one: its output ignores every token of the first."""
    bs = 16
    cu = torch.tensor([0, 20, 23], dtype=torch.int32)
    q, k, v = _qkv(1, 2, 2, 23, seed=8)
    mask = BlockMask.from_dense(torch.ones(2, 2, 2, 2, dtype=torch.bool), bs, 20)
    out = block_sparse_attention(q, k, v, mask, cu_seqlens=cu, impl="reference")
    alone = F.scaled_dot_product_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], is_causal=True)
    torch.testing.assert_close(out[:, :, 20:], alone, atol=ATOL, rtol=0)


def test_gradients_match_sdpa_on_all_kept_mask():
    t, bs, hq, hkv = 45, 16, 4, 2
    q, k, v = _qkv(2, hq, hkv, t, seed=21, requires_grad=True)
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    nb = num_blocks(t, bs)
    mask = BlockMask.from_dense(torch.ones(2, hkv, nb, nb, dtype=torch.bool), bs, t)
    w = torch.randn(2, hq, t, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (block_sparse_attention(q, k, v, mask, impl="reference") * w).sum().backward()
    (F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=True) * w).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)


def test_gradients_match_materialised_on_random_mask():
    t, bs, hq, hkv = 40, 8, 4, 1
    q, k, v = _qkv(1, hq, hkv, t, d=8, seed=31, requires_grad=True)
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    dense = _random_blocks(1, hq, num_blocks(t, bs), 0.3, seed=5)
    mask = BlockMask.from_dense(dense, bs, t)
    g = torch.Generator().manual_seed(2)
    w_o = torch.randn(1, hq, t, 8, generator=g, dtype=torch.float64)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="reference")
    assert not lse.requires_grad  # lse is returned detached (documented: not differentiable)
    (out * w_o).sum().backward()
    ref_out, _, _ = _brute_attention(q2, k2, v2, _token_keep(dense, bs, t))
    (ref_out * w_o).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mask_heads", ["hq", "hkv"])
def test_gradcheck_with_empty_rows_and_gqa(mask_heads):
    """torch.autograd.gradcheck (fp64) through the reference: GQA group 2, a partial last block, an
    empty row (no kept block) and a row keeping only a block above the diagonal."""
    t, bs, hq, hkv = 10, 4, 2, 1
    q, k, v = _qkv(1, hq, hkv, t, d=2, seed=41, requires_grad=True)
    dense = torch.ones(1, hq if mask_heads == "hq" else hkv, 3, 3, dtype=torch.bool).tril()
    dense[0, 0, 1] = False  # empty row
    dense[0, 0, 0] = torch.tensor([False, False, True])  # only a block above the diagonal
    mask = BlockMask.from_dense(dense, bs, t)
    assert torch.autograd.gradcheck(lambda a, b, c: block_sparse_attention(a, b, c, mask, impl="reference"), (q, k, v))
    out = block_sparse_attention(q, k, v, mask, impl="reference")
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq[0, 0, : 2 * bs] == 0).all() and not torch.isnan(dk).any() and not torch.isnan(dv).any()


def test_gradcheck_varlen():
    """gradcheck with packed sequences (one shorter than a block)."""
    cu = torch.tensor([0, 3, 9, 14], dtype=torch.int32)
    q, k, v = _qkv(1, 2, 1, 14, d=2, seed=43, requires_grad=True)
    mask = BlockMask.from_dense(_random_blocks(3, 1, 2, 0.5, seed=7), 4, 8)
    fn = lambda a, b, c: block_sparse_attention(a, b, c, mask, cu_seqlens=cu, impl="reference")
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_output_dtype_follows_input_fp32():
    q, k, v = _qkv(1, 2, 1, 30, dtype=torch.float32, seed=6)
    mask = BlockMask.from_dense(torch.ones(1, 2, 2, 2, dtype=torch.bool), 16, 30)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_package_exports_the_ops():
    assert seerattn.block_sparse_attention is block_sparse_attention
    assert seerattn.attention_with_block_scores is attention_with_block_scores
