"""BlockMask format: dense <-> (kv_num_blocks, kv_indices) round trip, density, token mask, flex export."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seerattn import BlockMask, block_sparse_attention
from seerattn.block_mask import causal_block_mask, num_blocks
from seerattn.ops.flex import to_flex_block_mask

HYP = settings(max_examples=50, deadline=None)


@st.composite
def dense_masks(draw):
    """A random bool [B, H, N, N] block mask plus a seq_len that N blocks of block_size cover."""
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    n = draw(st.integers(1, 9))
    bs = draw(st.sampled_from([1, 2, 16, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(b, h, n, n, generator=g) < p
    seq_len = draw(st.integers((n - 1) * bs + 1, n * bs))
    return dense, bs, seq_len


@HYP
@given(dense_masks())
def test_round_trip_and_index_layout(case):
    dense, bs, seq_len = case
    m = BlockMask.from_dense(dense, bs, seq_len)
    assert m.kv_num_blocks.dtype == torch.int32 and m.kv_indices.dtype == torch.int32
    assert m.shape == tuple(dense.shape) and m.block_size == bs and m.seq_len == seq_len
    assert torch.equal(m.to_dense(), dense)

    counts = dense.sum(-1)
    assert torch.equal(m.kv_num_blocks.long(), counts)
    n = dense.shape[-1]
    slot = torch.arange(n)
    valid = slot < m.kv_num_blocks.unsqueeze(-1)
    idx = m.kv_indices.long()
    # Valid slots: strictly ascending and exactly the kept columns; padding slots hold 0.
    assert (idx[~valid] == 0).all()
    if n > 1:
        both = valid[..., 1:]
        assert (idx[..., 1:] > idx[..., :-1])[both].all()
    for b, h, i in torch.nonzero(counts >= 0).tolist():
        c = int(counts[b, h, i])
        assert idx[b, h, i, :c].tolist() == torch.nonzero(dense[b, h, i]).flatten().tolist()

    # density(): kept causal blocks / causal blocks, by direct count.
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    expect = (dense & causal).sum().item() / (causal.sum().item() * dense.shape[0] * dense.shape[1])
    assert m.density() == pytest.approx(expect, abs=1e-12)


@HYP
@given(dense_masks())
def test_token_mask_and_token_density(case):
    dense, bs, seq_len = case
    m = BlockMask.from_dense(dense, bs, seq_len)
    tok = m.to_token_mask()
    assert tok.shape == (*dense.shape[:2], seq_len, seq_len)
    i = torch.arange(seq_len)
    expect = dense[:, :, i // bs][:, :, :, i // bs] & (i.view(-1, 1) >= i.view(1, -1))
    assert torch.equal(tok, expect)
    n_causal = seq_len * (seq_len + 1) / 2 * dense.shape[0] * dense.shape[1]
    assert m.token_density() == pytest.approx(expect.sum().item() / n_causal, abs=1e-12)


def test_from_explicit_indices_flex_convention():
    # Row 0 keeps {0}; row 1 keeps {0, 1}; row 2 keeps {2} -- stale non-zero values in padding slots.
    num = torch.tensor([[[1, 2, 1]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 2, 1], [0, 1, 1], [2, 2, 0]]]], dtype=torch.int32)
    m = BlockMask(num, idx, block_size=16, seq_len=40)
    expect = torch.tensor([[[[1, 0, 0], [1, 1, 0], [0, 0, 1]]]], dtype=torch.bool)
    assert torch.equal(m.to_dense(), expect)


def test_padding_slots_are_never_read():
    """Padding slots that repeat a kept column (or hold any other index) change nothing."""
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(2, 3, 6, 6, generator=g) < 0.4
    m = BlockMask.from_dense(dense, 16, 96)
    slot = torch.arange(6)
    valid = slot < m.kv_num_blocks.unsqueeze(-1)
    for junk in (
        m.kv_indices[..., :1].expand_as(m.kv_indices),  # repeat the first kept index
        torch.randint(0, 6, m.kv_indices.shape, generator=g, dtype=torch.int32),
        torch.full_like(m.kv_indices, 5),
    ):
        idx = torch.where(valid, m.kv_indices, junk.to(torch.int32)).contiguous()
        assert torch.equal(BlockMask(m.kv_num_blocks, idx, 16, 96).to_dense(), dense)


def test_flex_style_permutation_indices():
    """FlexAttention's own layout (kept columns first, then the others) decodes to the same mask."""
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(1, 2, 7, 7, generator=g) < 0.5
    perm = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    m = BlockMask(dense.sum(-1, dtype=torch.int32), perm, 64, 7 * 64 - 3)
    assert torch.equal(m.to_dense(), dense)


def test_num_blocks_and_causal_block_mask():
    assert [num_blocks(t, 64) for t in (1, 63, 64, 65, 128, 129)] == [1, 1, 1, 2, 2, 3]
    assert num_blocks(100, 16) == 7
    c = causal_block_mask(3)
    assert torch.equal(c, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # Bottom-right aligned when NQ < NK (decode / chunked prefill).
    c = causal_block_mask(2, 4)
    assert torch.equal(c, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))


def test_density_ignores_blocks_above_diagonal():
    full = BlockMask.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool), 16, 64)
    assert full.density() == 1.0
    lower = BlockMask.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool).tril(), 16, 64)
    assert lower.density() == 1.0
    diag = BlockMask.from_dense(torch.eye(4, dtype=torch.bool).view(1, 1, 4, 4), 16, 64)
    assert diag.density() == pytest.approx(4 / 10)
    upper_only = BlockMask.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool).triu(1), 16, 64)
    assert upper_only.density() == 0.0


def test_expand_heads_repeats_each_group():
    dense = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    dense[0, 0, :, 0] = True
    dense[0, 1] = torch.eye(3, dtype=torch.bool)
    m = BlockMask.from_dense(dense, 16, 48).expand_heads(6)
    assert m.num_heads == 6
    out = m.to_dense()
    for h in range(6):
        assert torch.equal(out[0, h], dense[0, h // 3])
    same = BlockMask.from_dense(dense, 16, 48)
    assert same.expand_heads(2) is same


def test_to_moves_both_tensors():
    m = BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, 32).to("meta")
    assert m.kv_num_blocks.device.type == "meta" and m.kv_indices.device.type == "meta"
    assert m.device.type == "meta"


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask as _FlexBlockMask  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _flex_available(), reason="torch without FlexAttention")
@HYP
@given(dense_masks())
def test_flex_block_mask_to_dense_equals_to_dense(case):
    dense, bs, seq_len = case
    m = BlockMask.from_dense(dense, bs, seq_len)
    fm = to_flex_block_mask(m, m.num_heads)
    assert tuple(fm.BLOCK_SIZE) == (bs, bs)
    assert torch.equal(fm.to_dense().bool(), m.to_dense())
    assert torch.equal(fm.kv_num_blocks + fm.full_kv_num_blocks, m.kv_num_blocks)
    # full blocks strictly below the block diagonal (no mask_mod there), partial ones on or above it
    nb = dense.shape[-1]
    rows = torch.arange(nb).view(nb, 1)
    slots = torch.arange(nb)
    full = slots < fm.full_kv_num_blocks.unsqueeze(-1)
    part = slots < fm.kv_num_blocks.unsqueeze(-1)
    assert bool((fm.full_kv_indices < rows)[full].all()) and bool((fm.kv_indices >= rows)[part].all())
    assert torch.equal(fm.full_kv_num_blocks, (m.to_dense() & torch.ones(nb, nb, dtype=torch.bool).tril(-1)).sum(-1))


@pytest.mark.skipif(not _flex_available(), reason="torch without FlexAttention")
@pytest.mark.parametrize("t,bs", [(70, 16), (128, 32)])
def test_flex_block_mask_runs_same_attention_in_eager_flex(t, bs):
    """Eager (CPU) flex_attention reads only mask_mod, so the exact mask_mod must carry the block bits."""
    from torch.nn.attention.flex_attention import flex_attention

    nb = num_blocks(t, bs)
    g = torch.Generator().manual_seed(t)
    dense = (torch.rand(2, 2, nb, nb, generator=g) < 0.4) | torch.eye(nb, dtype=torch.bool)
    m = BlockMask.from_dense(dense, bs, t)
    q, k, v = (torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = flex_attention(q, k, v, block_mask=to_flex_block_mask(m, 2, exact_mask_mod=True))
    ref = block_sparse_attention(q, k, v, m, impl="reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@HYP
@given(dense_masks())
def test_transposed_lists_are_the_lists_of_the_transposed_mask(case):
    """q_num_blocks / q_indices: for each key block the query blocks keeping it, ascending, built once."""
    dense, bs, seq_len = case
    m = BlockMask.from_dense(dense, bs, seq_len)
    t = dense.transpose(-1, -2)
    assert m.q_num_blocks.dtype == torch.int32 and m.q_indices.dtype == torch.int32
    assert torch.equal(m.q_num_blocks.long(), t.sum(-1))
    assert torch.equal(BlockMask(m.q_num_blocks, m.q_indices, bs, seq_len).to_dense(), t)
    assert m.q_indices is m.q_indices  # cached on the mask
    assert m.expand_heads(m.num_heads).q_indices is m.q_indices


@HYP
@given(dense_masks())
def test_policy_masks_count_densities_from_their_lists_exactly(case):
    """A policy's mask (causal by construction) takes the O(B H NQ) count from kv_num_blocks and each row's last
    index: exactly the general path's numbers, rows with and without the diagonal, empty rows, a partial last block."""
    from dataclasses import replace

    from seerattn.block_mask import SparsityPolicy, policy_source

    dense, bs, seq_len = case
    general = BlockMask.from_dense(dense & causal_block_mask(dense.shape[-1]), bs, seq_len)
    policy = replace(general, source=policy_source(SparsityPolicy("density", 0.1)))
    assert all(torch.equal(a, b) for a, b in zip(policy.densities(), general.densities(), strict=True))
